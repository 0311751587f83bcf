"""Selection: which classes, boxes and images a plan keeps.

The steps of a split's plan that decide what is kept (the reading is in
:mod:`~openimages_od.openimages.readboxes` and :mod:`~openimages_od.openimages.readimages`,
the writing in :mod:`~openimages_od.openimages.planwrite`):

- :func:`load_classes`: resolve ``selection.classes`` against the class files;
- :func:`class_targets`: which classes to read and the selected classes each one counts as
  (itself, plus its selected ancestors with ``selection.expand_hierarchy``, as the OID
  evaluation does);
- :func:`filter_boxes`: ``min_confidence`` and the attribute filters, then the expansion;
- :func:`group_by_image` (and :func:`add_label_only_images`): boxes grouped per image;
- :func:`apply_caps`: ``max_images_per_class`` and ``max_images`` by a seeded hash rank, so the
  choice is deterministic and independent of row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openimages_od.config import Config, SelectionConfig
from openimages_od.errors import ConfigError
from openimages_od.openimages.classes import (
    ClassDescriptions,
    Hierarchy,
    display_names,
    read_class_descriptions,
    read_hierarchy,
    read_trainable,
    resolve_classes,
    trainable_names,
)
from openimages_od.openimages.idkeys import IdSet, lower_hex_keys, rank, sorted_unique, strings
from openimages_od.openimages.inputs import MetadataInputs
from openimages_od.openimages.readboxes import Boxes

__all__ = [
    "ATTR_FIELDS",
    "ClassInfo",
    "ClassTargets",
    "ImageGroups",
    "KeptBoxes",
    "add_label_only_images",
    "apply_caps",
    "class_targets",
    "expand",
    "expansion",
    "filter_boxes",
    "group_by_image",
    "load_classes",
]

ATTR_FIELDS = ("is_occluded", "is_truncated", "is_group_of", "is_depiction", "is_inside")


# --------------------------------------------------------------------------- classes


@dataclass
class ClassInfo:
    """The selected classes and what is known about classes in general."""

    selected: list[str]
    names: dict[str, str]
    known: pa.Array | None
    hierarchy: Hierarchy | None
    ids: np.ndarray | None = None  # label-map id of each selected class (stable across re-plans)
    # selection.keep_all_labels: every other known class, in known order; their boxes are kept on
    # chosen images (class index n_selected + i) but never choose an image.
    extra: list[str] = field(default_factory=list)


def load_classes(cfg: Config, inputs: MetadataInputs) -> ClassInfo:
    """Read the class files of ``cfg.source`` and resolve ``cfg.selection``'s classes.

    Raises:
        ConfigError: ``expand_hierarchy`` without a hierarchy, or an empty selection.
    """
    src, sel = cfg.source, cfg.selection
    desc: ClassDescriptions | None = None
    hier: Hierarchy | None = None
    trainable: list[str] | None = None
    tnames: dict[str, str] = {}
    if src.class_descriptions:
        desc = read_class_descriptions(inputs.text(src.class_descriptions), src.class_descriptions)
    if src.hierarchy:
        hier = read_hierarchy(inputs.text(src.hierarchy), src.hierarchy)
    if src.trainable_classes:
        text = inputs.text(src.trainable_classes)
        trainable = read_trainable(text, src.trainable_classes)
        tnames = trainable_names(text, src.trainable_classes)
    if sel.expand_hierarchy and hier is None:
        raise ConfigError("selection.expand_hierarchy needs source.hierarchy (the box hierarchy JSON)")
    selected = resolve_classes(
        sel.classes,
        desc,
        hier,
        trainable,
        include_subclasses=sel.include_subclasses,
        trainable_only=sel.trainable_only,
    )
    if not selected:
        raise ConfigError("the selection is empty: no class matches selection.classes / trainable_only")
    known_set: list[str] = []
    seen: set[str] = set()
    for group in ((desc.mids if desc else []), (hier.order if hier else []), (trainable or [])):
        for m in group:
            if m not in seen:
                seen.add(m)
                known_set.append(m)
    known = strings(known_set) if known_set else None
    extra: list[str] = []
    if sel.keep_all_labels:
        if known is None:
            raise ConfigError(
                "selection.keep_all_labels needs the list of every class: set source.class_descriptions "
                "(or source.hierarchy / source.trainable_classes)"
            )
        chosen = set(selected)
        # trainable_only bounds the label map: the other classes kept are trainable ones too.
        pool = trainable if sel.trainable_only and trainable is not None else known_set
        extra = [m for m in pool if m not in chosen]
    return ClassInfo(selected, display_names(selected + extra, desc, tnames), known, hier, extra=extra)


@dataclass
class ClassTargets:
    """Which classes to read, and the selected-class indices each one counts as.

    ``box_keep`` are the classes whose boxes are read (the selected ones, plus their descendants
    when boxes are expanded upwards); ``box_targets[m]`` the selected classes a box of ``m`` is
    labelled with. Image-level labels: a positive label implies its ancestors
    (``pos_targets``), a negative one its descendants (``neg_targets``).
    """

    box_keep: list[str]
    box_targets: dict[str, list[int]]
    label_keep: list[str]
    pos_targets: dict[str, list[int]]
    neg_targets: dict[str, list[int]]


def class_targets(
    selected: list[str], hierarchy: Hierarchy | None, extra: list[str] | None = None
) -> ClassTargets:
    """The :class:`ClassTargets` of ``selected``; ``hierarchy`` given = expand along it.

    ``extra`` (``selection.keep_all_labels``): more classes whose boxes are read, at class
    indices after the selected ones; a box then counts for every ancestor among all of them,
    as the evaluation expands over the whole label map. Image-level labels stay those of the
    selected classes.
    """
    sel_index = {m: i for i, m in enumerate(selected)}
    axis = list(selected) + list(extra or ())
    box_index = {m: i for i, m in enumerate(axis)}
    keep = list(axis)
    box_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(axis)}
    lab_keep = list(selected)
    pos_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(selected)}
    neg_targets: dict[str, list[int]] = {m: [i] for i, m in enumerate(selected)}
    if hierarchy is not None:
        h = hierarchy
        for m in selected:
            for d in h.descendants(m):
                if d not in box_targets:
                    keep.append(d)
                    box_targets[d] = []
        for m in keep:
            box_targets[m] = sorted(
                set(box_targets[m]) | {box_index[a] for a in h.ancestors(m) if a in box_index}
            )
        for m in selected:
            for other in h.descendants(m) + h.ancestors(m):
                if other not in pos_targets:
                    lab_keep.append(other)
                    pos_targets[other] = []
                    neg_targets[other] = []
        for m in lab_keep:
            own = [sel_index[m]] if m in sel_index else []
            pos_targets[m] = sorted(set(own) | {sel_index[a] for a in h.ancestors(m) if a in sel_index})
            neg_targets[m] = sorted(set(own) | {sel_index[d] for d in h.descendants(m) if d in sel_index})
    return ClassTargets(keep, box_targets, lab_keep, pos_targets, neg_targets)


def expansion(keep: list[str], targets_of: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, flat) of selected-class indices each kept code maps to."""
    offs = [0]
    flat: list[int] = []
    for m in keep:
        t = targets_of.get(m, [])
        flat.extend(t)
        offs.append(len(flat))
    return np.asarray(offs, np.int64), np.asarray(flat, np.int32)


def expand(codes: np.ndarray, offs: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, repeat it once per target: returns (row index, target class index)."""
    counts = offs[codes + 1] - offs[codes]
    rows = np.repeat(np.arange(len(codes)), counts)
    starts = np.repeat(offs[codes], counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, flat[starts + within]


# --------------------------------------------------------------------------- boxes and images


@dataclass
class KeptBoxes:
    """The boxes that passed the filters, one entry per (box, target class) after expansion."""

    src_rows: np.ndarray  # row in :class:`Boxes`
    tgt: np.ndarray  # selected-class index
    image_id: pa.Array  # ImageID of each entry
    filtered_out: int  # boxes the confidence and attribute filters dropped
    outside_image_ids: int = 0  # boxes on images not in selection.image_ids


def filter_boxes(
    boxes: Boxes, sel: SelectionConfig, targets: ClassTargets, image_ids: IdSet | None = None
) -> KeptBoxes:
    """Apply ``image_ids``, ``min_confidence`` and the attribute filters, then expand each box to
    its targets."""
    keep_mask = boxes.confidence >= sel.min_confidence
    f = sel.filters
    for k, name in enumerate(ATTR_FIELDS):
        want = getattr(f, name)
        col = boxes.attrs[:, k]
        if want is not None:
            keep_mask &= (col == int(want)) | ((col == -1) & (not f.drop_unknown))
    filtered_out = int((~keep_mask).sum())
    outside = 0
    if image_ids is not None:
        listed = image_ids.contains(boxes.image_id)
        outside = int((keep_mask & ~listed).sum())
        keep_mask &= listed
    rows, tgt = expand(boxes.code[keep_mask], *expansion(targets.box_keep, targets.box_targets))
    src_rows = np.flatnonzero(keep_mask)[rows]
    b_ids = boxes.image_id.take(pa.array(src_rows)) if len(src_rows) else pa.array([], pa.string())
    return KeptBoxes(src_rows, tgt, b_ids, filtered_out, outside)


@dataclass
class ImageGroups:
    """The candidate images of a split: sorted unique ImageIDs and each kept box's image."""

    img_ids: pa.Array  # sorted unique ImageIDs
    b_img: np.ndarray  # position in img_ids of each KeptBoxes entry
    candidate: np.ndarray  # per image: enough boxes to be chosen (min_boxes_per_image)


def group_by_image(kept: KeptBoxes, n_sel: int, min_boxes_per_image: int) -> ImageGroups:
    """Group boxes by image without pandas: unique sorted ids and each box's image position.

    An image is a candidate with at least ``min_boxes_per_image`` (and one) boxes of the selected
    classes (class index < ``n_sel``; other classes, kept by ``keep_all_labels``, never choose).
    """
    b_ids = kept.image_id
    keys = lower_hex_keys(b_ids)
    if keys is not None:
        # Sorting uint64 keys is the string sort for these IDs, in a fraction of the memory of
        # Arrow's string hash tables (which were 2 GB for the 8M boxes of a 10x-size file).
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        img_ids = b_ids.take(pa.array(first)) if len(first) else pa.array([], pa.string())
        b_img = inverse.astype(np.int64).ravel()
    else:
        uniq = pc.unique(b_ids)
        img_ids = uniq.take(pc.sort_indices(uniq)) if len(uniq) else pa.array([], pa.string())
        b_img = (
            pc.index_in(b_ids, value_set=img_ids).to_numpy(zero_copy_only=False).astype(np.int64)
            if len(b_ids)
            else np.zeros(0, np.int64)
        )
    sel_box = kept.tgt < n_sel
    per_img = np.bincount(b_img if sel_box.all() else b_img[sel_box], minlength=len(img_ids))
    return ImageGroups(img_ids, b_img, per_img >= max(1, min_boxes_per_image))


def add_label_only_images(groups: ImageGroups, label_ids: pa.Array) -> ImageGroups:
    """With ``min_boxes_per_image: 0``: images with image-level labels but no box become candidates."""
    if not len(label_ids):
        return groups
    extra = pc.unique(label_ids)
    extra = extra.filter(pc.invert(pc.is_in(extra, value_set=groups.img_ids)))
    if not len(extra):
        return groups
    img_ids = pa.concat_arrays([groups.img_ids, extra])
    order_ids = pc.sort_indices(img_ids).to_numpy()
    img_ids = img_ids.take(pa.array(order_ids))
    inv = np.empty_like(order_ids)
    inv[order_ids] = np.arange(len(order_ids))
    # Candidates: those with boxes of selected classes (every box image, without keep_all_labels)
    # and every image with a label.
    candidate = np.zeros(len(img_ids), bool)
    candidate[inv[: len(groups.img_ids)]] = groups.candidate
    candidate[inv[len(groups.img_ids) :]] = True
    candidate |= pc.is_in(img_ids, value_set=label_ids).to_numpy(zero_copy_only=False)
    return ImageGroups(img_ids, inv[groups.b_img], candidate)


def apply_caps(groups: ImageGroups, tgt: np.ndarray, n_sel: int, sel: SelectionConfig) -> np.ndarray:
    """The chosen images (bool per image): the candidates, capped by a seeded rank.

    ``max_images_per_class`` keeps, per class, the best-ranked candidates that have a box of it;
    ``max_images`` then keeps the best-ranked of those. The rank is a hash of the ImageID and
    ``selection.seed``, so the choice does not depend on row order.
    """
    candidate, b_img, img_ids = groups.candidate, groups.b_img, groups.img_ids
    n_img = len(img_ids)
    chosen = candidate.copy()
    if sel.max_images_per_class is None and sel.max_images is None:
        return chosen
    rk = rank(img_ids, sel.seed)
    if sel.max_images_per_class is not None:
        sel_box = tgt < n_sel
        pairs = sorted_unique(b_img[sel_box].astype(np.int64) * n_sel + tgt[sel_box])
        p_img, p_cls = pairs // n_sel, pairs % n_sel
        m = candidate[p_img]
        p_img, p_cls = p_img[m], p_cls[m]
        order = np.lexsort((rk[p_img], p_cls))
        p_img, p_cls = p_img[order], p_cls[order]
        starts = np.searchsorted(p_cls, p_cls, side="left")
        within = np.arange(len(p_cls)) - starts
        chosen = np.zeros(n_img, bool)
        chosen[p_img[within < sel.max_images_per_class]] = True
    if sel.max_images is not None and chosen.sum() > sel.max_images:
        idx = np.flatnonzero(chosen)
        best = idx[np.argsort(rk[idx], kind="stable")[: sel.max_images]]
        chosen = np.zeros(n_img, bool)
        chosen[best] = True
    return chosen
