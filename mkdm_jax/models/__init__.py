"""Models: BERT, RoBERTa, MPNet and BiLSTM encoders, the multi-head classifier, HF checkpoint I/O."""
from mkdm_jax.models.bert import BertConfig, BertEncoder, RobertaConfig
from mkdm_jax.models.bilstm import BiLSTMConfig, BiLSTMEncoder, bilstm_embeddings_from_bert
from mkdm_jax.models.checkpoints import (count_params, cut_layers, export_hf, load_hf_encoder, load_tokenizer,
                                         resolve_checkpoint)
from mkdm_jax.models.classifier import Classifier, combination_weights, encoder_kind
from mkdm_jax.models.mpnet import MPNetConfig, MPNetEncoder

__all__ = [
    'BertConfig', 'BertEncoder', 'BiLSTMConfig', 'BiLSTMEncoder', 'Classifier', 'MPNetConfig', 'MPNetEncoder',
    'RobertaConfig', 'bilstm_embeddings_from_bert', 'combination_weights', 'count_params', 'cut_layers',
    'encoder_kind', 'export_hf', 'load_hf_encoder', 'load_tokenizer', 'resolve_checkpoint',
]
