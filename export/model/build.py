"""Build the PyTorch port of DVIS-DAQ offline from a resolved config.

Maps config keys onto module constructors the way the official ``from_config`` class methods do:
``DVIS_DAQ_offline.from_config`` (``dvis_daq/meta_architecture.py``: tracker, refiner, inference
values), ``MSDeformAttnPixelDecoder.from_config`` (``transformer_dim_feedforward`` is hard-coded
to 1024 there), ``VideoMultiScaleMaskedTransformerDecoder_dvisPlus.from_config``
(``dec_layers = DEC_LAYERS - 1``), detectron2's ``build_resnet_backbone``,
``D2VitAdapterDinoV2`` (``vit_adapter.py``).
"""
from __future__ import annotations

from typing import Any

from dvis_trt.export.config import inference_config
from dvis_trt.errors import InputError

from .backbone import build_resnet
from .dvis_daq import DvisDaqOffline
from .dvis_daq_online import DvisDaqOnline
from .pixel_decoder import MSDeformAttnPixelDecoder
from .predictor import VideoMultiScaleMaskedTransformerDecoder_dvisPlus
from .refiner import TemporalRefiner
from .segmenter import SemSegHead
from .tracker import VideoInstanceCutter

SUPPORTED_BACKBONES = ("build_resnet_backbone", "D2VitAdapterDinoV2")


def _check_supported(cfg: Any, archs=("DVIS_DAQ_offline",)) -> None:
    where = f" (config {cfg.source})" if getattr(cfg, "source", None) else ""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in archs:
        raise InputError(f"MODEL.META_ARCHITECTURE is {arch!r}{where}; dvis-trt exports "
                         "DVIS_DAQ_offline models (use an offline DAQ config)")
    backbone = cfg.MODEL.BACKBONE.NAME
    if backbone not in SUPPORTED_BACKBONES:
        raise InputError(f"backbone {backbone!r}{where} is not supported yet; supported: "
                         f"{', '.join(SUPPORTED_BACKBONES)} (ResNet, ViT-Adapter-L)")
    task = cfg.get("MODEL.MASK_FORMER.TEST.TASK", "vis")
    if task != "vis":
        why = {"vos": "semi-supervised VOS matches predictions to each video's first-frame "
                      "object masks, an input dvis-trt does not take"}.get(
            task, "only video instance segmentation is exported")
        raise InputError(f"MODEL.MASK_FORMER.TEST.TASK is {task!r}{where}: {why}; to run the "
                         "model as VIS, export with --opts MODEL.MASK_FORMER.TEST.TASK=vis")
    dec = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if dec != "VideoMultiScaleMaskedTransformerDecoder_dvisPlus":
        raise InputError(f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME is {dec!r}{where}; "
                         "expected VideoMultiScaleMaskedTransformerDecoder_dvisPlus")


def build_model(cfg: Any) -> DvisDaqOffline:
    """Build ``DvisDaqOffline`` (random init, eval mode) from a resolved config.

    Args:
        cfg: a :class:`dvis_trt.export.config.Config` (``load_config(path)``).
    Returns:
        the model in eval mode; its ``state_dict()`` names and shapes equal the official
        model's for the same config.
    Raises:
        InputError: for a meta-architecture, backbone or decoder this port does not implement.
    """
    _check_supported(cfg)
    backbone, sem_seg_head, tracker, settings = _segmenter_and_tracker(cfg)
    m, mf, vh = cfg.MODEL, cfg.MODEL.MASK_FORMER, cfg.MODEL.VIDEO_HEAD
    refiner = TemporalRefiner(
        hidden_channel=int(mf.HIDDEN_DIM), feedforward_channel=int(mf.DIM_FEEDFORWARD),
        num_head=int(mf.NHEADS), decoder_layer_num=int(m.REFINER.DECODER_LAYERS),
        mask_dim=int(mf.HIDDEN_DIM), class_num=int(m.SEM_SEG_HEAD.NUM_CLASSES),
        windows=int(mf.TEST.WINDOW_SIZE), use_local_attn=bool(vh.USE_LOCAL_ATTN))
    model = DvisDaqOffline(backbone, sem_seg_head, tracker, refiner, settings)
    return model.eval()


def build_online_model(cfg: Any) -> DvisDaqOnline:
    """Build ``DvisDaqOnline`` (random init, eval mode) from a resolved config: an official
    ``DVIS_DAQ_online`` config (its checkpoints load strictly), or an offline one (its
    segmenter and tracker; load such a checkpoint with ``strict=False`` or through the bundle).

    Raises:
        InputError: as :func:`build_model`.
    """
    _check_supported(cfg, ("DVIS_DAQ_online", "DVIS_DAQ_offline"))
    backbone, sem_seg_head, tracker, settings = _segmenter_and_tracker(cfg)
    return DvisDaqOnline(backbone, sem_seg_head, tracker, settings).eval()


def _segmenter_and_tracker(cfg: Any):
    """(backbone, sem_seg_head, tracker, settings) built as the official ``from_config``."""
    m = cfg.MODEL
    r = m.RESNETS
    if m.BACKBONE.NAME == "D2VitAdapterDinoV2":
        from .vit_adapter import build_vit_adapter
        backbone = build_vit_adapter(cfg)
    else:
        backbone = build_resnet(
            depth=int(r.DEPTH), stem_out_channels=int(r.STEM_OUT_CHANNELS),
            res2_out_channels=int(r.RES2_OUT_CHANNELS), num_groups=int(r.NUM_GROUPS),
            width_per_group=int(r.WIDTH_PER_GROUP), stride_in_1x1=bool(r.STRIDE_IN_1X1),
            res5_dilation=int(r.RES5_DILATION), out_features=tuple(r.OUT_FEATURES), norm=r.NORM)
    shapes = backbone.output_shape()
    ssh, mf = m.SEM_SEG_HEAD, m.MASK_FORMER
    pixel_decoder = MSDeformAttnPixelDecoder(
        {k: v for k, v in shapes.items() if k in tuple(ssh.IN_FEATURES)},
        conv_dim=int(ssh.CONVS_DIM), mask_dim=int(ssh.MASK_DIM), norm=ssh.NORM,
        transformer_dropout=float(mf.DROPOUT), transformer_nheads=int(mf.NHEADS),
        transformer_dim_feedforward=1024,  # hard-coded in the official from_config
        transformer_enc_layers=int(ssh.TRANSFORMER_ENC_LAYERS),
        transformer_in_features=tuple(ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
        common_stride=int(ssh.COMMON_STRIDE),
        enc_n_points=4)  # official from_config never reads ..._ENCODER_N_POINTS: always 4
    predictor = VideoMultiScaleMaskedTransformerDecoder_dvisPlus(
        in_channels=int(ssh.CONVS_DIM), num_classes=int(ssh.NUM_CLASSES),
        hidden_dim=int(mf.HIDDEN_DIM), num_queries=int(mf.NUM_OBJECT_QUERIES),
        nheads=int(mf.NHEADS), dim_feedforward=int(mf.DIM_FEEDFORWARD),
        dec_layers=int(mf.DEC_LAYERS) - 1, pre_norm=bool(mf.PRE_NORM),
        mask_dim=int(ssh.MASK_DIM), enforce_input_project=bool(mf.ENFORCE_INPUT_PROJ),
        num_reid_head_layers=int(mf.NUM_REID_HEAD_LAYERS),
        reid_hidden_dim=int(mf.REID_HIDDEN_DIM))
    sem_seg_head = SemSegHead(pixel_decoder, predictor)
    vh = m.VIDEO_HEAD
    tracker = VideoInstanceCutter(
        hidden_dim=int(mf.HIDDEN_DIM), feedforward_dim=int(mf.DIM_FEEDFORWARD),
        num_head=int(mf.NHEADS), decoder_layer_num=int(m.TRACKER.DECODER_LAYERS),
        mask_dim=int(mf.HIDDEN_DIM),  # official: mask_dim=cfg.MODEL.MASK_FORMER.HIDDEN_DIM
        num_classes=int(ssh.NUM_CLASSES), num_new_ins=int(vh.NUM_NEW_INS),
        num_slots=int(vh.NUM_SLOTS), num_queries=int(mf.NUM_OBJECT_QUERIES))
    settings = inference_config(cfg)
    return backbone, sem_seg_head, tracker, settings
