"""A labelled figure of `unifusion sample --prompts ...` output: one row per prompt, the prompt
written beside it, "held-out" where the prompt names a combination the training split never
contains (shapes.HELD_OUT), and the shipped attribute classifier's verdict (colour + shape of the
main object) under each sample.

    unifusion sample --checkpoint runs/t2i --prompts examples/prompts.txt --n 8 --cfg 3 --out s.npz
    python benchmarks/prompt_grid.py s.npz docs/t2i_samples.png
"""
from __future__ import annotations

import argparse
import re
import textwrap

import numpy as np
import torch

from unifusion.data import shapes
from unifusion.networks import classifiers


def held_out_names(prompt: str) -> list[str]:
    """The HELD_OUT combinations a prompt names (its colour-shape pairs and its relation)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    pairs = {f"{a} {b}" for a, b in zip(words, words[1:])}
    found = [k for k, kind in shapes.HELD_OUT.items() if kind == "colour-shape" and k in pairs]
    found += [k for k, kind in shapes.HELD_OUT.items() if kind == "relation"
              and all(w in words for w in k.split()) and _relation_matches(words, k)]
    return found


def _relation_matches(words: list[str], relation: str) -> bool:
    a, rel, b = relation.split()[0], relation.split()[1], relation.split()[2]
    shapes_in = [w for w in words if w in shapes.SHAPES]
    return len(shapes_in) == 2 and shapes_in[0] == a and shapes_in[1] == b and rel in words


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("npz", help="output of unifusion sample --prompts")
    p.add_argument("png", help="the figure")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.load(args.npz, allow_pickle=False)
    x, prompts = d["x"], [str(s) for s in d["prompts"]]
    colours = list(shapes.COLOURS)
    order = list(dict.fromkeys(prompts))
    per = len(prompts) // len(order)
    clf = classifiers.load_shapes_attributes()[0]
    with torch.no_grad():
        pred = clf.predict(torch.from_numpy(x).float())
    fig, axes = plt.subplots(len(order), per, figsize=(1.05 * per + 3.6, 1.2 * len(order)), squeeze=False)
    for r, prompt in enumerate(order):
        held = held_out_names(prompt)
        for c in range(per):
            i = r * per + c
            ax = axes[r][c]
            ax.imshow(((x[i].transpose(1, 2, 0) + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            verdict = f"{colours[int(pred['colour'][i])]} {shapes.SHAPES[int(pred['shape'][i])]}"
            ax.set_xlabel(verdict, fontsize=6, labelpad=1)
        label = textwrap.fill(prompt, 26) + ("\n(held-out: " + ", ".join(held) + ")" if held else "\n(seen)")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7, labelpad=6)
    fig.tight_layout(pad=0.3)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
