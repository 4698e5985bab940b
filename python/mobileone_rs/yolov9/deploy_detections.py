"""Detections from a deploy ONNX output, and mAP@0.5 of one model's detections against another's."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

IOU_NMS = 0.45  # detect.py's default
MAX_DETECTIONS = 300


def detections(output: np.ndarray, nc: int | None, conf: float) -> np.ndarray:
    """``(n, 6)`` rows ``x1 y1 x2 y2 score class`` of one image's ``(1, 4 + nc [+ masks], anchors)`` output,
    after class-aware NMS, best class per anchor (as detect.py / val.py without ``--multi-label``)."""
    pred = torch.from_numpy(np.asarray(output[0], dtype=np.float32)).T  # (anchors, channels)
    nc = pred.shape[1] - 4 if nc is None else nc
    xywh, scores = pred[:, :4], pred[:, 4 : 4 + nc]
    score, cls = scores.max(1)
    keep = score > conf
    xywh, score, cls = xywh[keep], score[keep], cls[keep]
    boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    order = torchvision.ops.batched_nms(boxes, score, cls, IOU_NMS)[:MAX_DETECTIONS]
    return torch.cat([boxes[order], score[order, None], cls[order, None].float()], 1).numpy()


def _ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, 101-point interpolation (COCO's, as YOLOv9's ap_per_class)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(np.concatenate(([1.0], precision, [0.0])))))
    x = np.linspace(0, 1, 101)
    return float(np.mean(np.interp(x, mrec, mpre)))


def map50(truth: list[np.ndarray], predicted: list[np.ndarray]) -> float | None:
    """mAP@0.5 of ``predicted`` scored against ``truth`` (per image, rows as :func:`detections`); None
    when ``truth`` has no detection at all."""
    classes = sorted({int(c) for t in truth for c in t[:, 5]})
    if not classes:
        return None
    aps = []
    for c in classes:
        scored, n_truth = [], 0
        for t, p in zip(truth, predicted, strict=True):
            t, p = t[t[:, 5] == c], p[p[:, 5] == c]
            n_truth += len(t)
            p = p[np.argsort(-p[:, 4])]
            taken = np.zeros(len(t), bool)
            iou = torchvision.ops.box_iou(torch.from_numpy(p[:, :4]), torch.from_numpy(t[:, :4])).numpy()
            for k in range(len(p)):
                j = int(iou[k].argmax()) if len(t) else -1
                hit = j >= 0 and iou[k, j] >= 0.5 and not taken[j]
                if hit:
                    taken[j] = True
                scored.append((p[k, 4], hit))
        scored.sort(key=lambda s: -s[0])
        hits = np.array([h for _, h in scored], dtype=np.float64)
        tp = np.cumsum(hits)
        recall = tp / n_truth if len(hits) else np.zeros(0)
        precision = tp / np.arange(1, len(hits) + 1) if len(hits) else np.zeros(0)
        aps.append(_ap(recall, precision))
    return round(float(np.mean(aps)), 4)
