"""Models: BERT and BiLSTM encoders, the multi-head classifier, HF checkpoint I/O."""
from mkdm_jax.models.bert import BertConfig, BertEncoder
from mkdm_jax.models.bilstm import BiLSTMConfig, BiLSTMEncoder, bilstm_embeddings_from_bert
from mkdm_jax.models.checkpoints import (count_params, cut_bottom_layers, export_hf, load_hf_bert,
                                         load_tokenizer, resolve_checkpoint)
from mkdm_jax.models.classifier import Classifier, build_classifier, combination_weights

__all__ = [
    'BertConfig', 'BertEncoder', 'BiLSTMConfig', 'BiLSTMEncoder', 'Classifier', 'bilstm_embeddings_from_bert',
    'build_classifier', 'combination_weights', 'count_params', 'cut_bottom_layers', 'export_hf',
    'load_hf_bert', 'load_tokenizer', 'resolve_checkpoint',
]
