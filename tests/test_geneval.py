"""GenEval-style prompt following on the shapes (evaluation/geneval.py) and the shipped attribute
classifier: prompt sets hold (or avoid) the HELD_OUT combinations as asked and are worded in the
caption grammar; true renderings of the prompts score ~1 on every task; the same images shuffled
score what the prompts' own labels agree on by chance."""
import json

import numpy as np
import pytest
import torch

from unifusion import data
from unifusion.data import shapes as S
from unifusion.evaluation import geneval as G
from unifusion.networks import classifiers as C

pytestmark = pytest.mark.usefixtures("one_thread")
N = 40  # prompts per task and held-out setting


@pytest.fixture(scope="module")
def classifier():
    return C.load_shapes_attributes()[0]


@pytest.fixture(scope="module")
def suite():
    s = G.prompt_suite(N, seed=3)
    specs = s["seen"] + s["held_out"]
    return specs, G.render_prompts(specs, seed=5)


# ------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("task", G.TASKS)
def test_prompts_hold_or_avoid_held_out_combinations(task):
    for held_out in (False, True):
        specs = G.prompts(task, held_out, 60, seed=1)
        assert len(specs) == 60 and all(p.task == task for p in specs)
        assert specs == G.prompts(task, held_out, 60, seed=1) and specs != G.prompts(task, held_out, 60, seed=2)
        labels = G._labels([p.shape for p in specs], [p.colour for p in specs], [p.size for p in specs],
                           [p.relation for p in specs])
        kinds = S.held_out_kinds(labels)
        for i, p in enumerate(specs):
            names = tuple(k for k in S.HELD_OUT if kinds[k][i])
            assert p.held_out == names  # what the spec says it holds is what it holds
            assert bool(names) == held_out, (task, held_out, p.text)
            if held_out:  # the kind the task is about
                want = {"position": {"relation"}, "two_objects": {"relation", "colour-shape"},
                        "counting": {"relation", "colour-shape"}}.get(task, {"colour-shape"})
                assert {S.HELD_OUT[k] for k in names} & want
            # worded exactly in the caption grammar, following the data's rules
            assert p.text == S.caption_of(labels, i)
            assert p.count == {"single_object": 1, "colour": 1}.get(task, p.count)
            if task in ("two_objects", "position", "colour_attribution"):
                assert p.count == 2
            if p.count == 2:
                assert 0 <= p.relation < 4 and not (p.size[1] == 1 and p.size[0] == 0)
            else:
                assert p.relation == -1
            if task == "colour_attribution":
                assert p.colour[0] != p.colour[1]
    counts = {p.count for p in G.prompts("counting", False, 60, seed=1)}
    assert counts == {1, 2}


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown geneval task"):
        G.prompts("spatial", False, 3)
    assert G.prompts("colour", True, 0) == []


def test_rendered_prompts_satisfy_their_specs(suite):
    specs, x = suite
    assert x.shape == (len(specs), 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    t = G.spec_labels(specs)
    fixed = {k: t[k] for k in ("count", "shape", "colour", "size", "shape2", "colour2", "size2")}
    fixed["relation"] = np.maximum(t["relation"], 0)
    s = S.scenes_t2i(5, G.RENDER_OFFSET + np.arange(len(specs)), fixed=fixed)
    np.testing.assert_array_equal(S._relation(s), t["relation"])
    for i, p in enumerate(specs):
        assert S.caption(s, i) == p.text
    assert torch.equal(G.render_prompts(specs[:9], seed=5), x[:9])
    assert G.render_prompt(specs[0], seed=5).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="large second object"):
        S.scenes_t2i(0, [0], fixed={"count": 2, "size": 0, "size2": 1})


# ------------------------------------------------------------------------------ scoring
def test_true_images_score_about_one(suite, classifier):
    specs, x = suite
    r = G.score(x, specs, classifier)
    assert set(r["accuracy"]) == set(G.TASKS) and r["n"] == len(specs)
    for task, acc in r["accuracy"].items():
        assert acc >= 0.95, (task, acc)
    assert r["colour_shape"] >= 0.97 and r["overall"] >= 0.97
    s = G.seen_vs_held_out(r, specs)
    assert s["seen"]["n"] == s["held_out"]["n"] == 6 * N
    assert s["held_out"]["colour_shape"] >= 0.95 and abs(s["gap"]["colour_shape"]) <= 0.05
    table = G.format_table({"seen": s["seen"], "held-out": s["held_out"]})
    assert table.count("\n") == 3 and "colour attribution" in table
    # 64x64 renderings are read too (resampled to 32)
    r64 = G.score(G.render_prompts(specs[::4], seed=5, resolution=64), specs[::4], classifier)
    assert r64["overall"] >= 0.95


def test_shuffled_images_score_at_chance(suite, classifier):
    specs, x = suite
    perm = np.random.default_rng(0).permutation(len(specs))
    r = G.score(x[perm], specs, classifier)
    # an image of prompt perm[i] passes prompt i's check about as often as prompt perm[i]'s own
    # labels do: the chance level of each task under this shuffle
    chance, chance_cs = G.task_checks(G.spec_labels([specs[j] for j in perm]), specs)
    tasks = np.array([p.task for p in specs])
    for task in G.TASKS:
        want = chance[tasks == task].mean()
        assert abs(r["accuracy"][task] - want) <= 0.06, (task, r["accuracy"][task], want)
        assert want <= (0.7 if task == "counting" else 0.3)
    assert abs(r["colour_shape"] - chance_cs.mean()) <= 0.04 and r["colour_shape"] < 0.15


def test_score_checks_are_the_documented_ones():
    """Hand-made predictions against hand-made specs: each task's rule, including the converse
    reading of a two-object image."""
    sq_above_ci = G.PromptSpec("position", "", (1, 0), (0, 2), (1, 0), 2)
    pred = {"shape": [0], "colour": [2], "size": [1], "shape2": [1], "colour2": [0], "size2": [0],
            "count": [2], "relation": [3]}  # the circle named first, below the square: the same picture
    for task, ok in (("position", True), ("two_objects", True), ("colour_attribution", True), ("counting", True),
                     ("colour", False), ("single_object", False)):
        spec = G.PromptSpec(task, "", sq_above_ci.shape, sq_above_ci.colour, sq_above_ci.size, 2)
        correct, colour_shape = G.task_checks(pred, [spec])
        assert bool(correct[0]) == ok and not colour_shape[0], task
    wrong_rel = dict(pred, relation=[2])
    assert not G.task_checks(wrong_rel, [sq_above_ci])[0][0]
    swapped_colours = dict(pred, colour=[0], colour2=[2])
    spec = G.PromptSpec("colour_attribution", "", (1, 0), (0, 2), (1, 0), 2)
    assert not G.task_checks(swapped_colours, [spec])[0][0]
    one = G.PromptSpec("single_object", "", (2,), (5,), (0,), -1)
    single = {"shape": [2], "colour": [4], "size": [1], "shape2": [-1], "colour2": [-1], "size2": [-1],
              "count": [1], "relation": [-1]}
    correct, colour_shape = G.task_checks(single, [one])
    assert correct[0] and not colour_shape[0]  # shape and count right; the colour is not this task's
    with pytest.raises(ValueError, match="one image"):
        G.score(torch.zeros(2, 3, 32, 32), [one])


# ------------------------------------------------------------------------------ the classifier
def test_shipped_attribute_classifier_is_small_documented_and_accurate(classifier):
    assert C.SHAPES_ATTRIBUTES_WEIGHTS.stat().st_size < 2 * 2**20
    _, meta = C._load_safetensors(C.SHAPES_ATTRIBUTES_WEIGHTS)
    info = json.loads(meta["unifusion"])
    assert {"command", "date", "test_accuracy", "cpu_minutes"} <= set(info)
    doc = info["test_accuracy"]["t2i-32"]
    assert all(doc[h] >= 0.98 for h in C.ATTRIBUTE_HEADS), doc
    src = data.load("shapes-t2i-32-test:300")
    x, a = src.arrays()[0], src.attributes(range(300))
    p = {k: v.numpy() for k, v in classifier.predict(x).items()}
    truth = {"shape": a["shape"][:, 0], "colour": a["colour"][:, 0], "size": a["size"][:, 0],
             "shape2": a["shape"][:, 1], "colour2": a["colour"][:, 1], "size2": a["size"][:, 1],
             "count": a["count"], "relation": a["relation"]}
    for head, t in truth.items():
        assert (p[head] == t).mean() >= doc[head] - 0.03, head
    assert classifier.training is False and set(classifier.logits(x[:2])) == set(C.ATTRIBUTE_HEADS)
