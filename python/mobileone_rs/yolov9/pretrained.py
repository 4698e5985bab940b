"""ImageNet-pretrained MobileOne backbones for YOLOv9: initial weights for the S0-S4 model yamls.

The yamls (:mod:`mobileone_rs.yolov9.yamls`, package data) are YOLOv9-C with Apple's MobileOne variant
as its backbone, layer for layer: layer 1 is ``stage0``, layers 2-5 are ``stage1`` .. ``stage4``.

Usage::

    python -m mobileone_rs.pretrained --weights CKPT --cfg YAML --out init.pt
    python -m mobileone_rs.pretrained --write-yamls PATH [--force]  # into PATH/models/detect/

The first form converts CKPT (Apple's ``mobileone_sX_unfused.pth.tar``, timm's
``mobileone_sX.apple_in1k`` weights, or mmpretrain's ``mobileone-sX_8xb32_in1k`` checkpoint) and writes
a checkpoint whose model holds exactly the detector's backbone layers under YOLOv9's names
(``model.1.``, ``model.2.stage.{j}.`` ...), for ``train_dual.py --weights init.pt --cfg YAML``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import OrderedDict
from dataclasses import astuple

import torch
from torch import nn

from .._native import MobileOneError
from ..backbone import Variant, get_variant, yaml_stages
from ..checkpoints import CheckpointError, ConvertedCheckpoint, convert_checkpoint
from ..files import check_writable, replacing
from ..modules import MobileOne, MobileOneBlock
from .yamls import YAML_NAMES, read_yaml, write_yamls

__all__ = ["main", "yolov9_backbone"]

EXIT_OK, EXIT_REFUSED = 0, 2


def _backbone_layers(spec: Variant, cfg_text: str) -> tuple[int, list[int]]:
    """The stem's layer index and the four stages' indices, checked against the variant."""
    stages = yaml_stages(cfg_text)
    wanted = spec.stages()
    found = [args for _, args, _ in stages]
    if found != wanted:
        have = "; ".join(f"layer {i}: MobileOne{list(astuple(a))}" for i, a, _ in stages)
        need = "; ".join(f"MobileOne{list(astuple(a))}" for a in wanted)
        raise CheckpointError(
            f"the model yaml's backbone is not MobileOne-{spec.name.upper()}'s: it has "
            f"{have or 'no MobileOne'}, "
            f"the checkpoint needs {need} (use {YAML_NAMES[spec.name]})"
        )
    indices = [i for i, _, _ in stages]
    stem = indices[0] - 1
    if indices != list(range(indices[0], indices[0] + 4)) or stem < 0 or stages[0][2] != 2:
        raise CheckpointError(
            "the model yaml's MobileOne stages must be four consecutive layers right after the stem "
            f"(a stride-2 MobileOneBlock); found them at layers {indices}"
        )
    return stem, indices


def yolov9_backbone(
    converted: ConvertedCheckpoint, cfg_text: str
) -> tuple[nn.Module, dict[str, tuple[str, int]]]:
    """A module whose ``state_dict`` is the detector's backbone under YOLOv9's names, loaded strictly.

    Returns the module (``model.{layer}...`` keys) and, per Apple stage, ``(YOLOv9 layer, tensors)``.
    """
    if converted.variant is None:
        raise CheckpointError("the checkpoint is not one of Apple's MobileOne S0-S4 variants")
    spec = get_variant(converted.variant)
    stem, indices = _backbone_layers(spec, cfg_text)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        {str(stem): MobileOneBlock(3, spec.stem_channels, 3, stride=2, padding=1)}
    )
    for index, args in zip(indices, spec.stages()):
        layers[str(index)] = MobileOne(*astuple(args))
    names = {"stage0": f"model.{stem}."}
    names.update({f"stage{k}": f"model.{i}.stage." for k, i in enumerate(indices, start=1)})
    state = OrderedDict()
    for key, value in converted.items():
        stage, rest = key.split(".", 1)
        if stage != "linear":
            state[names[stage] + rest] = value
    root = nn.Module()
    root.model = nn.Sequential(layers)
    root.load_state_dict(state, strict=True)
    counts = {
        stage: (prefix.split(".")[1], sum(k.startswith(prefix) for k in root.state_dict()))
        for stage, prefix in names.items()
    }
    return root, counts


_FUSED_REFUSAL = (
    "{path} is a fused (inference) checkpoint: each block is one reparam_conv, without the train-time "
    "branches and batch norms YOLOv9 trains, so it cannot initialize training (the branches cannot be "
    "recovered exactly). Use the train-time weights: Apple's mobileone_{v}_unfused.pth.tar, timm's "
    "mobileone_{v}.apple_in1k or mmpretrain's checkpoint. A fused checkpoint initializes an inference "
    "model only: mobileone_rs.mobileone('{v}', "
    "inference_mode=True).load_state_dict(convert_checkpoint(path))."
)


def _convert(args) -> ConvertedCheckpoint:
    converted = convert_checkpoint(args.weights, args.source, weights_only=not args.trust_pickle)
    print(f"{args.weights}: {converted.summary()}")
    if converted.fused:
        raise CheckpointError(_FUSED_REFUSAL.format(path=args.weights, v=converted.variant or "sX"))
    if converted.fused is None:
        raise CheckpointError(
            f"{args.weights}: some blocks are fused and some are not; YOLOv9 trains train-time blocks only"
        )
    if converted.variant is None:
        raise CheckpointError(
            f"{args.weights}: its tensors do not have the names and shapes of Apple's MobileOne S0-S4"
        )
    return converted


def _write_init(args) -> None:
    check_writable([args.out])  # before reading the checkpoint
    converted = _convert(args)
    model, counts = yolov9_backbone(converted, read_yaml(args.cfg))
    total = len(model.state_dict())
    checkpoint = {
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "opt": None,
        "git": None,
        "date": datetime.datetime.now().isoformat(),
        "mobileone_rs": {
            "weights": str(args.weights),
            "source": converted.source,
            "variant": converted.variant,
            "tensors": total,
        },
    }
    with replacing(args.out) as tmp:  # whole or not at all: an old init.pt stays until the new one is written
        torch.save(checkpoint, tmp)
    print(f"{'Apple':<8} {'YOLOv9':<9} tensors")
    for stage, (layer, count) in counts.items():
        print(f"{stage:<8} model.{layer:<3} {count:>7}")
    head = [k for k in converted if k.startswith("linear.")]
    if head:
        print(
            f"{'linear':<8} {'-':<9} {len(head):>7}  (the {converted.num_classes}-class ImageNet classifier: "
            "no detector layer takes it)"
        )
    print(
        f"wrote {args.out}: {total} backbone tensors, nothing else dropped; train_dual.py --weights "
        f"{args.out} --cfg {args.cfg} should print 'Transferred {total}/...'"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mobileone_rs.pretrained", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--weights", help="MobileOne ImageNet checkpoint (Apple, timm or mmpretrain; train-time)"
    )
    mode.add_argument("--write-yamls", metavar="PATH", help="write the S0-S4 yamls into PATH/models/detect/")
    parser.add_argument(
        "--cfg", help="YOLOv9 model yaml (a path, or a packaged name such as yolov9-c-mobileone-s0.yaml)"
    )
    parser.add_argument("--out", default="init.pt", help="checkpoint to write (default init.pt)")
    parser.add_argument("--source", default="auto", choices=["auto", "apple", "timm", "mmpretrain"])
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --write-yamls: overwrite yamls that differ from ours (e.g. edited ones)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load CKPT with weights_only=False (only for a file you trust)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 when refused, with the reason on stderr)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.write_yamls:
            for path, written in write_yamls(args.write_yamls, force=args.force):
                print(f"wrote {path}" if written else f"{path}: up to date")
            return EXIT_OK
        if not args.cfg:
            parser.error("--weights needs --cfg")
        _write_init(args)
    except MobileOneError as exc:  # CheckpointError, YamlError (the model yaml), WriteError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
