"""GenEval-style prompt following for text-to-image models of the procedural `shapes` (Ghosh et al.
2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"), scored by the
shipped attribute classifier (networks/classifiers.py: ShapesAttributeClassifier) instead of an
object detector.

1. `prompts(task, held_out, n, seed)` builds prompt specs: each carries its caption (worded exactly
   in the shapes caption grammar, `shapes.caption_of`) and its target attributes. With
   held_out=True every prompt contains a `shapes.HELD_OUT` combination (never in the t2i train
   split), with held_out=False none does.
2. The caller samples one image per prompt (no sampling here).
3. `score(images, specs)` reads the attributes off the images and checks each prompt's task.

What each task checks (pred = the classifier's reading of the image; object 0 = the main, larger
object, named first; object 1 = the second):

  single_object       "a large red square": count == 1 and shape of object 0 right
                      (GenEval: the object is there; colour and size are other tasks' business)
  two_objects         "a .. square above a .. circle": count == 2 and the two shapes right as a
                      pair in either order (GenEval: both objects are there)
  counting            a 1- or 2-object prompt: count right
  colour              "a small blue circle": colour of object 0 right
  position            a 2-object prompt: count == 2 and (shape 0, shape 1, relation) right, or its
                      converse reading (the objects' roles swapped and the relation reversed:
                      "a circle below a square" is the same picture as "a square above a circle")
  colour_attribution  a 2-object prompt with two different colours: count == 2 and both objects'
                      (shape, colour) right, in either role (each colour on the right shape)

and on every prompt the headline **colour+shape accuracy**: object 0's shape and colour both right
(strict roles: the main object is the one the prompt names first). Sizes are not scored (they only
decide which object is the main one). A task's accuracy is the fraction of its prompts that pass;
"overall" is the mean over the tasks present (GenEval's overall score).

`seen_vs_held_out(result, specs)` splits every number by whether the prompt holds a HELD_OUT
combination and gives the gap (seen - held-out); `format_table` prints such summaries as markdown.
`render_prompt(s)` draws true t2i images of specs (the test that the scoring reads ~1 on them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import shapes

TASKS = ("single_object", "two_objects", "counting", "colour", "position", "colour_attribution")
RENDER_OFFSET = 2 * shapes.TEST_OFFSET   # global indices of render_prompts' scenes (apart from both splits)
_CONVERSE = np.array([1, 0, 3, 2])        # left of <-> right of, above <-> below
# which HELD_OUT kinds make a held-out prompt of each task (held_out=False prompts contain none)
_NEEDS = {"single_object": ("colour-shape",), "colour": ("colour-shape",),
          "colour_attribution": ("colour-shape",), "position": ("relation",),
          "two_objects": ("colour-shape", "relation"), "counting": ("colour-shape", "relation")}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and what an image for it must show. Attributes are indices into shapes.SHAPES,
    COLOUR_NAMES, SIZES, RELATIONS, per object (object 0 first; one or two objects)."""

    task: str
    text: str
    shape: tuple[int, ...]
    colour: tuple[int, ...]
    size: tuple[int, ...]
    relation: int = -1              # object 0 relative to object 1; -1 with one object
    held_out: tuple[str, ...] = ()  # the HELD_OUT combinations the prompt contains (names)

    @property
    def count(self) -> int:
        return len(self.shape)


def _labels(shape, colour, size, relation) -> dict[str, np.ndarray]:
    """Label arrays (B, 3 slots) in ShapesSource.attributes' convention from per-prompt tuples."""
    B = len(shape)
    out = {k: np.full((B, shapes.MAX_OBJECTS), -1, np.int64) for k in ("shape", "colour", "size")}
    for b in range(B):
        for k, v in (("shape", shape[b]), ("colour", colour[b]), ("size", size[b])):
            out[k][b, :len(v)] = v
    out["count"] = np.array([len(v) for v in shape], np.int64)
    out["relation"] = np.asarray(relation, np.int64).reshape(B)
    return out


def spec_labels(specs: list[PromptSpec]) -> dict[str, np.ndarray]:
    """The specs' targets as classifier-style predictions: "shape", "colour", "size", "shape2",
    "colour2", "size2", "count", "relation" (B,) each, -1 where object 1 is absent."""
    a = _labels([s.shape for s in specs], [s.colour for s in specs], [s.size for s in specs],
                [s.relation for s in specs])
    return {"shape": a["shape"][:, 0], "colour": a["colour"][:, 0], "size": a["size"][:, 0],
            "shape2": a["shape"][:, 1], "colour2": a["colour"][:, 1], "size2": a["size"][:, 1],
            "count": a["count"], "relation": a["relation"]}


def _draw(task: str, rng: np.random.Generator, force_relation: bool) -> tuple:
    """One random (shape, colour, size, relation) for `task`, following the data's rules (a large
    second object only beside a large main one; two colours for colour_attribution)."""
    two = task in ("two_objects", "position", "colour_attribution") or (task == "counting" and rng.random() < 0.5)
    shape = [int(rng.integers(len(shapes.SHAPES)))]
    colour = [int(rng.integers(len(shapes.COLOURS)))]
    size = [int(rng.integers(2))]
    relation = -1
    if two:
        shape.append(int(rng.integers(len(shapes.SHAPES))))
        colour.append(int(rng.integers(len(shapes.COLOURS))))
        size.append(int(size[0] == 1 and rng.random() < 0.5))
        relation = int(rng.integers(len(shapes.RELATIONS)))
        if task == "colour_attribution":
            while colour[1] == colour[0]:
                colour[1] = int(rng.integers(len(shapes.COLOURS)))
        if force_relation:  # the held-out relation combination itself, other attributes random
            shape[0], relation, shape[1] = map(int, shapes.HELD_OUT_RELATIONS[
                int(rng.integers(len(shapes.HELD_OUT_RELATIONS)))])
    return tuple(shape), tuple(colour), tuple(size), relation


def prompts(task: str, held_out: bool, n: int, seed: int = 0) -> list[PromptSpec]:
    """n prompt specs of `task` (one of TASKS), drawn from `seed`: with held_out=True each contains a
    HELD_OUT combination (a held-out colour-shape pair for single_object, colour and
    colour_attribution; the held-out relation for position; either for two_objects and counting),
    with held_out=False none. Attributes are uniform otherwise; prompts may repeat."""
    if task not in TASKS:
        raise ValueError(f"unknown geneval task {task!r}; choose one of {list(TASKS)}")
    if n < 0:
        raise ValueError(f"geneval: n must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), TASKS.index(task), int(held_out)])
    out = []
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            break
        shape, colour, size, relation = _draw(task, rng, force_relation=held_out and task == "position")
        a = _labels([shape], [colour], [size], [relation])
        names = tuple(k for k, v in shapes.held_out_kinds(a).items() if v[0])
        wanted = [k for k in names if shapes.HELD_OUT[k] in _NEEDS[task]]
        if (held_out and not wanted) or (not held_out and names):
            continue
        out.append(PromptSpec(task, shapes.caption_of(a, 0), shape, colour, size, relation, names))
    if len(out) < n:  # unreachable with the shipped HELD_OUT; a guard against an edited one
        raise RuntimeError(f"geneval: could not draw {n} {task} prompts with held_out={held_out}")
    return out


def prompt_suite(n: int, seed: int = 0) -> dict[str, list[PromptSpec]]:
    """{"seen": n prompts of every task without held-out combinations, "held_out": n of every task
    with one}: the full benchmark, 2 x 6 x n prompts."""
    return {"seen": [p for t in TASKS for p in prompts(t, False, n, seed)],
            "held_out": [p for t in TASKS for p in prompts(t, True, n, seed)]}


def render_prompts(specs: list[PromptSpec], seed: int = 0, resolution: int = 32) -> Tensor:
    """True t2i images (N, 3, res, res) in [-1, 1] of the specs: scene i is drawn from (seed, global
    index RENDER_OFFSET + i) with the spec's labels fixed (`shapes.scenes_t2i(..., fixed=)`)."""
    if resolution not in shapes.RESOLUTIONS:
        raise ValueError(f"geneval: resolution must be one of {list(shapes.RESOLUTIONS)}, got {resolution}")
    if not specs:
        return torch.zeros((0, 3, resolution, resolution))
    t = spec_labels(specs)
    fixed = {k: t[k] for k in ("count", "shape", "colour", "size", "shape2", "colour2", "size2")}
    fixed["relation"] = np.maximum(t["relation"], 0)  # any relation where one object (unused)
    s = shapes.scenes_t2i(seed, RENDER_OFFSET + np.arange(len(specs)), fixed=fixed)
    return torch.from_numpy(shapes.render(s, resolution) * 2 - 1)


def render_prompt(spec: PromptSpec, seed: int = 0, resolution: int = 32) -> Tensor:
    """A true t2i image (3, res, res) in [-1, 1] of one spec (render_prompts([spec], seed)[0])."""
    return render_prompts([spec], seed, resolution)[0]


def task_checks(pred: dict, specs: list[PromptSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(passes its task, colour+shape right) per prompt, (N,) bool each, from predicted labels in
    the classifier's convention (see spec_labels) and the specs; the checks of the module docstring."""
    p = {k: np.asarray(v) for k, v in pred.items()}
    t = spec_labels(specs)
    colour_shape = (p["shape"] == t["shape"]) & (p["colour"] == t["colour"])
    two = p["count"] == 2
    same = (p["shape"] == t["shape"]) & (p["shape2"] == t["shape2"])
    swapped = (p["shape"] == t["shape2"]) & (p["shape2"] == t["shape"])
    rel = np.where(t["relation"] >= 0, t["relation"], 0)
    checks = {
        "single_object": (p["count"] == 1) & (p["shape"] == t["shape"]),
        "two_objects": two & (same | swapped),
        "counting": p["count"] == t["count"],
        "colour": p["colour"] == t["colour"],
        "position": two & ((same & (p["relation"] == t["relation"])) | (swapped & (p["relation"] == _CONVERSE[rel]))),
        "colour_attribution": two & ((same & (p["colour"] == t["colour"]) & (p["colour2"] == t["colour2"]))
                                     | (swapped & (p["colour"] == t["colour2"]) & (p["colour2"] == t["colour"]))),
    }
    task = np.array([s.task for s in specs])
    correct = np.zeros(len(specs), bool)
    for name, ok in checks.items():
        correct = np.where(task == name, ok, correct)
    return correct, colour_shape


_CLASSIFIER = None


def _classifier():
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from ..networks.classifiers import load_shapes_attributes
        _CLASSIFIER = load_shapes_attributes()[0]
    return _CLASSIFIER


def _summary(correct: np.ndarray, colour_shape: np.ndarray, tasks: np.ndarray) -> dict:
    acc = {t: float(correct[tasks == t].mean()) for t in TASKS if (tasks == t).any()}
    return {"accuracy": acc, "overall": float(np.mean(list(acc.values()))) if acc else float("nan"),
            "colour_shape": float(colour_shape.mean()) if len(colour_shape) else float("nan"),
            "n": len(correct)}


def score(images, specs: list[PromptSpec], classifier=None, batch_size: int = 500) -> dict:
    """GenEval-style scores of `images` (N, 3, H, W) in [-1, 1] (32x32 or 64x64; one per spec, in
    order) for the prompt `specs`, read by `classifier` (a ShapesAttributeClassifier; the shipped
    one by default). Returns {"accuracy": {task: fraction passing}, "overall": mean over tasks,
    "colour_shape": fraction with object 0's shape and colour right, "n", and per prompt
    "correct", "colour_shape_correct" (N,) bool and "pred" (the classifier's labels)}."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or len(x) != len(specs):
        raise ValueError(f"geneval.score: need one image (N, 3, H, W) per spec; got images of shape "
                         f"{tuple(x.shape)} for {len(specs)} specs")
    net = classifier if classifier is not None else _classifier()
    pred = {k: v.numpy() for k, v in net.predict(x, batch_size=batch_size).items()}
    correct, colour_shape = task_checks(pred, specs)
    out = _summary(correct, colour_shape, np.array([s.task for s in specs]))
    out.update(correct=correct, colour_shape_correct=colour_shape, pred=pred)
    return out


def seen_vs_held_out(result: dict, specs: list[PromptSpec]) -> dict:
    """{"seen": summary, "held_out": summary, "gap": {"colour_shape", "overall", per task: seen -
    held_out}} of a `score` result, splitting the prompts by whether they hold a HELD_OUT
    combination (a summary: "accuracy" per task, "overall", "colour_shape", "n")."""
    held = np.array([bool(s.held_out) for s in specs])
    tasks = np.array([s.task for s in specs])
    c, cs = np.asarray(result["correct"]), np.asarray(result["colour_shape_correct"])
    seen, ho = _summary(c[~held], cs[~held], tasks[~held]), _summary(c[held], cs[held], tasks[held])
    gap = {k: seen[k] - ho[k] for k in ("colour_shape", "overall")}
    gap.update({t: seen["accuracy"][t] - ho["accuracy"][t] for t in TASKS
                if t in seen["accuracy"] and t in ho["accuracy"]})
    return {"seen": seen, "held_out": ho, "gap": gap}


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table of summaries (name -> a summary as in seen_vs_held_out): colour+shape, every
    task's accuracy, overall, n."""
    cols = ["colour_shape", *TASKS, "overall", "n"]
    lines = ["| | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        vals = [r["colour_shape"], *[r["accuracy"].get(t, float("nan")) for t in TASKS], r["overall"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {r['n']} |")
    return "\n".join(lines)
