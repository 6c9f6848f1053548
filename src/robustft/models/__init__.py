"""Backbones, their weights on disk and linear heads. This module only re-exports; the code is in

- `backbone`: building a backbone with random weights (the toy ResNet or a timm model wrapped
  in `TimmBackbone`), `ImageClassifier` (normalisation, backbone, linear head) and the
  backbone options (`check_backbone_kwargs`);
- `weights`: a backbone's folder in the weight cache (`meta.json` and its weights file):
  `save_backbone`, `load_backbone` (local files only; `BackboneNotFetchedError`),
  `load_state`, `save_model`;
- `heads`: `head.safetensors` files, the one writer `save_head` and the one reader `load_head`;
- `preprocess`: the input preprocessing of a backbone (`Preprocess`);
- `toy`: the toy ResNet; `keymap`: renaming and reading foreign state dicts;
- `fetch`: filling the weight cache (not re-exported here: it is the one module that needs
  the network).

timm is imported inside functions: importing this package does not import timm, so the probe
and report jobs need no timm.
"""

from __future__ import annotations

from robustft.models.backbone import BACKBONE_KWARGS as BACKBONE_KWARGS
from robustft.models.backbone import EMBEDDINGS as EMBEDDINGS
from robustft.models.backbone import MOCO_V2_BACKBONE as MOCO_V2_BACKBONE
from robustft.models.backbone import TOY_BACKBONE as TOY_BACKBONE
from robustft.models.backbone import ImageClassifier as ImageClassifier
from robustft.models.backbone import TimmBackbone as TimmBackbone
from robustft.models.backbone import build_backbone as build_backbone
from robustft.models.backbone import check_backbone_kwargs as check_backbone_kwargs
from robustft.models.backbone import create_timm_backbone as create_timm_backbone
from robustft.models.backbone import default_embedding as default_embedding
from robustft.models.backbone import pretrained_num_classes as pretrained_num_classes
from robustft.models.heads import HEAD_FILE as HEAD_FILE
from robustft.models.heads import Head as Head
from robustft.models.heads import load_head as load_head
from robustft.models.heads import save_head as save_head
from robustft.models.preprocess import INTERPOLATIONS as INTERPOLATIONS
from robustft.models.preprocess import PREPROCESS_KEYS as PREPROCESS_KEYS
from robustft.models.preprocess import Preprocess as Preprocess
from robustft.models.preprocess import merge_preprocess as merge_preprocess
from robustft.models.preprocess import timm_preprocess as timm_preprocess
from robustft.models.toy import ToyResNet as ToyResNet
from robustft.models.weights import FORMAT_STATE_DICT as FORMAT_STATE_DICT
from robustft.models.weights import FORMAT_TIMM as FORMAT_TIMM
from robustft.models.weights import META_FILE as META_FILE
from robustft.models.weights import WEIGHTS_FILE as WEIGHTS_FILE
from robustft.models.weights import BackboneNotFetchedError as BackboneNotFetchedError
from robustft.models.weights import fetch_command as fetch_command
from robustft.models.weights import load_backbone as load_backbone
from robustft.models.weights import load_state as load_state
from robustft.models.weights import save_backbone as save_backbone
from robustft.models.weights import save_model as save_model
from robustft.models.weights import weights_path as weights_path
from robustft.models.weights import write_meta as write_meta
