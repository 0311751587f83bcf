"""One split's plan, as named steps.

:func:`plan_split` runs, all in bounded memory:

1. :func:`~openimages_od.openimages.readboxes.read_boxes`: read and validate the box CSV;
2. :func:`~openimages_od.openimages.selection.filter_boxes`: attribute filters,
   ``min_confidence`` and the optional hierarchy expansion;
3. :func:`~openimages_od.openimages.selection.group_by_image`: boxes grouped per image (and
   :func:`read_labels`, the image-level labels, which can add label-only images);
4. :func:`~openimages_od.openimages.selection.apply_caps`: the images chosen;
   :func:`final_boxes`, :func:`box_lists` and :func:`label_lists`: the per-image lists;
5. and 6. :func:`~openimages_od.openimages.planwrite.write_shards`: shards assigned, the image
   index streamed and joined, shards written a bucket of shards at a time;
   :func:`split_stats`: the split's stats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.config import Config
from openimages_od.openimages import planio
from openimages_od.openimages.formats import MalformedLog
from openimages_od.openimages.idkeys import sorted_unique, strings
from openimages_od.openimages.idlist import ImageIdList
from openimages_od.openimages.inputs import MetadataInputs
from openimages_od.openimages.planwrite import write_shards
from openimages_od.openimages.readboxes import Boxes, read_boxes
from openimages_od.openimages.readimages import read_image_labels
from openimages_od.openimages.selection import (
    ClassInfo,
    ClassTargets,
    ImageGroups,
    KeptBoxes,
    add_label_only_images,
    apply_caps,
    class_targets,
    expand,
    expansion,
    filter_boxes,
    group_by_image,
)
from openimages_od.storage import Storage

__all__ = ["FinalBoxes", "ImageLabels", "plan_split"]


@dataclass
class ImageLabels:
    """Image-level labels of selected classes, one per (label row, target class), in file order."""

    image_id: pa.Array
    target: np.ndarray  # selected-class index
    confidence: np.ndarray

    def only(self, mask: np.ndarray) -> ImageLabels:
        """The labels where ``mask`` is true."""
        if mask.all():
            return self
        return ImageLabels(self.image_id.filter(pa.array(mask)), self.target[mask], self.confidence[mask])


@dataclass
class FinalBoxes:
    """The chosen images and their boxes, ordered by image, then file order."""

    image_ids: pa.Array  # sorted
    src: np.ndarray  # row in :class:`Boxes` of each box
    tgt: np.ndarray  # selected-class index of each box
    counts: np.ndarray  # boxes per image


def plan_split(
    cfg: Config,
    split: str,
    inputs: MetadataInputs,
    ci: ClassInfo,
    storage: Storage,
    plan_url: str,
    image_ids: ImageIdList | None = None,
    extra_ids: Callable[[list[str]], dict[str, int]] | None = None,
) -> tuple[planio.SplitManifest, dict[str, Any]]:
    """Plan one split: read, select, write its Parquet shards.

    Args:
        cfg: the config (``source``, ``selection``, ``shards``).
        split: the split's name (a key of ``source.splits``).
        inputs: resolves the metadata URLs to local files.
        ci: the selected classes (with their label-map ids).
        storage: the storage layer.
        plan_url: the plan directory.
        image_ids: ``selection.image_ids`` (the listed ids this split holds are marked seen).
        extra_ids: ``selection.keep_all_labels``: gives label-map ids to the other classes found
            on the chosen images (the label map grows as splits are planned).

    Returns:
        (the split's manifest entry, its stats).
    """
    sel = cfg.selection
    ss = cfg.source.splits[split]
    logm = MalformedLog(strict=sel.strict)
    n_sel = len(ci.selected)
    targets = class_targets(ci.selected, ci.hierarchy if sel.expand_hierarchy else None, ci.extra)

    boxes = read_boxes(inputs.local(ss.boxes), ss.boxes, ci.known, strings(targets.box_keep), logm)
    kept = filter_boxes(boxes, sel, targets, image_ids.members if image_ids is not None else None)
    groups = group_by_image(kept, n_sel, sel.min_boxes_per_image)
    labels = None
    if image_ids is not None:
        image_ids.mark_seen(boxes.image_id)
    if ss.image_labels:
        # Read before choosing images so min_boxes_per_image=0 can add label-only images.
        labels = read_labels(inputs, ss.image_labels, ci, targets, logm)
        if image_ids is not None:
            image_ids.mark_seen(labels.image_id)
            labels = labels.only(image_ids.members.contains(labels.image_id))
        if sel.min_boxes_per_image == 0:
            groups = add_label_only_images(groups, labels.image_id)
    chosen = apply_caps(groups, kept.tgt, n_sel, sel)
    final = final_boxes(groups, chosen, kept)

    ids_np = ci.ids if ci.ids is not None else np.arange(1, n_sel + 1, dtype=np.int32)
    axis = ci.selected + ci.extra
    present = [axis[i] for i in np.unique(final.tgt[final.tgt >= n_sel])]
    if ci.extra:
        # keep_all_labels: the other classes found here get ids (absent ones are never referenced).
        got = extra_ids(present) if extra_ids is not None else {}
        ids_np = np.concatenate([ids_np, np.array([got.get(m, 0) for m in ci.extra], np.int32)])
    mids_arr = pa.array(axis, pa.string())
    boxes_col = box_lists(final, boxes, ids_np, mids_arr)
    labels_col, n_labels = label_lists(labels, final.image_ids, ids_np, mids_arr)
    boxes, kept, groups, final = _release_per_box_arrays(boxes, kept, groups, final)
    paths, shas, missing = write_shards(
        storage,
        plan_url,
        split,
        final.image_ids,
        cfg.source.images.key_template,
        (inputs.local(ss.images), ss.images) if ss.images else None,
        logm,
        boxes_col,
        labels_col,
        cfg.shards.images_per_shard,
    )
    stats = split_stats(axis, n_sel, boxes, kept, groups, final, n_labels, len(paths), missing, logm)
    if image_ids is not None:
        stats["boxes_outside_image_ids"] = kept.outside_image_ids
    if sel.keep_all_labels:
        stats["other_classes"] = len(present)
    manifest = planio.SplitManifest(
        num_shards=len(paths),
        num_images=len(final.image_ids),
        num_boxes=len(final.tgt),
        shards=paths,
        shard_sha256=shas,
    )
    return manifest, stats


def _release_per_box_arrays(
    boxes: Boxes, kept: KeptBoxes, groups: ImageGroups, final: FinalBoxes
) -> tuple[Boxes, KeptBoxes, ImageGroups, FinalBoxes]:
    """The same objects without the per-box arrays that the ``boxes`` column now holds (fresh empty
    arrays, not slices, so the buffers go): only what the stats read is kept. Before the image index
    is read, this is ~0.6 GB at 10x the V6 train size."""
    empty_ids = pa.array([], pa.string())
    boxes = replace(
        boxes,
        image_id=empty_ids,
        coords=np.zeros((0, 4), np.float32),
        confidence=np.zeros(0, np.float32),
        attrs=np.zeros((0, 5), np.int8),
    )
    kept = replace(kept, src_rows=np.zeros(0, np.int64), image_id=empty_ids)
    groups = replace(groups, b_img=np.zeros(0, np.int64))
    final = replace(final, src=np.zeros(0, np.int64))
    return boxes, kept, groups, final


def read_labels(
    inputs: MetadataInputs, url: str, ci: ClassInfo, targets: ClassTargets, logm: MalformedLog
) -> ImageLabels:
    """The image-level labels of ``url`` mapped to selected classes: a positive label (confidence
    >= 0.5) counts for its selected ancestors too, a negative one for its selected descendants."""
    lab_keep = targets.label_keep
    l_ids, l_code, l_conf = read_image_labels(
        inputs.local(url), url, ci.known, pa.array(lab_keep, pa.string()), logm
    )
    positive = l_conf >= 0.5
    r_pos, t_pos = expand(l_code[positive], *expansion(lab_keep, targets.pos_targets))
    r_neg, t_neg = expand(l_code[~positive], *expansion(lab_keep, targets.neg_targets))
    src = np.concatenate([np.flatnonzero(positive)[r_pos], np.flatnonzero(~positive)[r_neg]])
    tg = np.concatenate([t_pos, t_neg]).astype(np.int32)
    order = np.argsort(src, kind="stable")
    src, tg = src[order], tg[order]
    return ImageLabels(l_ids.take(pa.array(src)) if len(src) else pa.array([], pa.string()), tg, l_conf[src])


def final_boxes(groups: ImageGroups, chosen: np.ndarray, kept: KeptBoxes) -> FinalBoxes:
    """The chosen images and their boxes, ordered by image then file order."""
    n_img = len(groups.img_ids)
    new_pos = np.full(n_img, -1, np.int64)
    new_pos[chosen] = np.arange(int(chosen.sum()))
    final_ids = groups.img_ids.filter(pa.array(chosen)) if n_img else groups.img_ids
    b_img = groups.b_img
    bsel = new_pos[b_img] >= 0 if len(b_img) else np.zeros(0, bool)
    b_pos = new_pos[b_img][bsel]
    order = np.argsort(b_pos, kind="stable")
    return FinalBoxes(
        image_ids=final_ids,
        src=kept.src_rows[bsel][order],
        tgt=kept.tgt[bsel][order],
        counts=np.bincount(b_pos, minlength=len(final_ids)),
    )


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))


def box_lists(final: FinalBoxes, boxes: Boxes, ids_np: np.ndarray, mids_arr: pa.Array) -> pa.Array:
    """The ``boxes`` column: a list of :data:`planio.BOX_TYPE` per chosen image."""
    b_src, b_tgt = final.src, final.tgt
    box_struct = pa.StructArray.from_arrays(
        [
            pa.array(ids_np[b_tgt], pa.int32()),
            mids_arr.take(pa.array(b_tgt.astype(np.int64))) if len(b_tgt) else pa.array([], pa.string()),
            *(pa.array(boxes.coords[b_src, k], pa.float32()) for k in range(4)),
            pa.array(boxes.confidence[b_src], pa.float32()),
            *(pa.array(boxes.attrs[b_src, k], pa.int8()) for k in range(5)),
        ],
        fields=list(planio.BOX_TYPE),
    )
    return pa.ListArray.from_arrays(_offsets(final.counts), box_struct)


def label_lists(
    labels: ImageLabels | None, final_ids: pa.Array, ids_np: np.ndarray, mids_arr: pa.Array
) -> tuple[pa.Array, int]:
    """The ``image_labels`` column of the chosen images (null without a labels file) and its size.

    One label per (image, class): a verified positive wins over a negative.
    """
    n_final = len(final_ids)
    if labels is None:
        return pa.nulls(n_final, pa.list_(planio.IMAGE_LABEL_TYPE)), 0
    n_cls = len(mids_arr)
    l_pos_f = (
        np.asarray(pc.fill_null(pc.index_in(labels.image_id, value_set=final_ids), -1))
        if len(labels.image_id)
        else np.zeros(0, np.int64)
    )
    lm = l_pos_f >= 0
    lp, lt, lc = l_pos_f[lm], labels.target[lm], labels.confidence[lm]
    key = lp.astype(np.int64) * n_cls + lt
    o = np.lexsort((-lc, key))
    key, lp, lt, lc = key[o], lp[o], lt[o], lc[o]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    lp, lt, lc = lp[first], lt[first], lc[first]
    lab_struct = pa.StructArray.from_arrays(
        [
            pa.array(ids_np[lt], pa.int32()),
            mids_arr.take(pa.array(lt.astype(np.int64))) if len(lt) else pa.array([], pa.string()),
            pa.array(lc, pa.float32()),
        ],
        fields=list(planio.IMAGE_LABEL_TYPE),
    )
    return pa.ListArray.from_arrays(_offsets(np.bincount(lp, minlength=n_final)), lab_struct), len(lt)


def split_stats(
    axis: list[str],
    n_sel: int,
    boxes: Boxes,
    kept: KeptBoxes,
    groups: ImageGroups,
    final: FinalBoxes,
    n_labels: int,
    n_shards: int,
    missing: int,
    logm: MalformedLog,
) -> dict[str, Any]:
    """The split's entry of ``plan/stats.json`` (per class: the selected classes, then the other
    classes ``keep_all_labels`` found, at class indices ``n_sel`` on of ``axis``)."""
    n_axis = len(axis)
    n_final = len(final.image_ids)
    b_tgt = final.tgt
    box_per_cls = np.bincount(b_tgt, minlength=n_axis)
    pairs = sorted_unique(np.repeat(np.arange(n_final), final.counts).astype(np.int64) * n_axis + b_tgt)
    img_per_cls = np.bincount(pairs % n_axis, minlength=n_axis) if len(pairs) else np.zeros(n_axis, np.int64)
    return {
        "images": n_final,
        "boxes": len(b_tgt),
        "image_labels": n_labels,
        "shards": n_shards,
        "rows_read": boxes.rows_read,
        "boxes_valid_selected": len(boxes.code),
        "boxes_filtered_out": kept.filtered_out,
        "images_without_index_row": missing,
        "images_before_caps": int(groups.candidate.sum()),
        "classes": {
            m: {"images": int(img_per_cls[i]), "boxes": int(box_per_cls[i])}
            for i, m in enumerate(axis)
            if i < n_sel or box_per_cls[i]
        },
        "malformed": logm.to_json(),
        "malformed_total": logm.total,
    }
