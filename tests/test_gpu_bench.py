"""CPU smoke test of benchmarks/gpu.py: the --smoke run's tables, the FLOP count against
FlopCounterMode, the SDPA-backend reading, the device peak table, the wall-time guard and the
no-CUDA exit. The GPU benchmark itself never runs here."""
import contextlib
import io
import json
import math

import pytest
import torch

from benchmarks import gpu

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TRAIN_COLS = ["model", "batch", "precision", "compile", "grad ckpt", "ms/step", "img/s", "TFLOP/s", "MFU",
              "peak GiB", "first step s", "note"]
SAMPLE_COLS = ["model", "batch", "images", "s", "img/s", "TFLOP/s", "MFU", "note"]


def tables(text: str) -> dict[str, list[dict]]:
    """Markdown tables by the line of the '## ...' heading above them, as lists of column -> cell."""
    out, heading, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, rows = line, None
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows, cols = [], cells
                out[heading] = rows
            elif set(line) - set("|-"):
                rows.append(dict(zip(cols, cells)))
    return out


def run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = gpu.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("gpu") / "rows.json"
    try:
        rc, text = run(["--smoke", "--device", "cpu", "--profile", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return rc, text, json.loads(path.read_text())


def test_smoke_prints_every_row_with_finite_numbers(smoke):
    rc, text, rows = smoke
    assert rc == 0, text
    assert text.startswith("# unifusion GPU benchmark: CPU") and "torch " + torch.__version__ in text
    found = tables(text)
    (train,) = [v for k, v in found.items() if k.startswith("## Training")]
    (sample,) = [v for k, v in found.items() if k.startswith("## Sampling")]
    (models,) = [v for k, v in found.items() if k.startswith("## Models")]
    assert list(train[0]) == TRAIN_COLS and list(sample[0]) == SAMPLE_COLS
    labels = ["DiT-S/2", "DiT-B/2", "DiT-L/2"]
    assert [r["model"] for r in models] == labels
    configs = {(r["precision"], r["compile"], r["grad ckpt"]) for r in train}
    assert configs == {("bf16", "off", "off"), ("bf16", "on", "off"), ("bf16", "off", "on"),
                       ("fp16+GradScaler", "off", "off")}
    assert [r["model"] for r in train] == [m for m in labels for _ in range(4)]
    for r in train:
        assert r["note"] == "", r
        for col in ("ms/step", "img/s", "TFLOP/s", "first step s"):
            assert math.isfinite(float(r[col])) and float(r[col]) >= 0, (r, col)
        assert r["MFU"] == "-" and r["peak GiB"] == "-"  # the CPU has no peak and no CUDA allocator
    for r in sample:
        assert r["note"] == "" and float(r["img/s"]) > 0 and r["images"] == "8", r
    # the JSON rows carry the same runs, with finite losses and timings
    assert len(rows["train"]) == 12 and len(rows["sample"]) == 3 and rows["errors"] == 0
    for r in rows["train"]:
        assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["images_per_s"] > 0
    for m in rows["models"]:
        assert "flash" in m["sdpa"] or "math" in m["sdpa"], m  # read off the profiler, whichever ran
        assert m["counted_train_gflop_per_img"] == pytest.approx(m["analytic_train_gflop_per_img"], rel=0.03)
    # --profile: the top ops of DiT-B/2 with compile (dynamo's eager backend under --smoke)
    assert "## Profile: DiT-B/2 bf16 compile on" in text and rows["profile"]["top"]


def test_smoke_prints_the_side_by_side_default_run_unet_and_compiled_sampling_rows(smoke):
    rc, text, rows = smoke
    found = tables(text)
    (side,) = [v for k, v in found.items() if k.startswith("## Side by side: DiT-B/2")]
    assert [(r["network"], r["compile"]) for r in side] == [("unifusion", "off"), ("diffusers", "off"),
                                                            ("unifusion", "on"), ("diffusers", "on")]
    for r in side:  # diffusers (a test extra) is installed here: every row ran, each against its peer
        assert r["note"] == "" and float(r["img/s"]) > 0 and math.isfinite(float(r["vs diffusers"])), r
    assert [float(r["vs diffusers"]) for r in side if r["network"] == "diffusers"] == [1.0, 1.0]
    (cli,) = [v for k, v in found.items() if k.startswith("## Default CLI run")]
    assert [(r["device"], r["compile"]) for r in cli] == [("cpu", "off"), ("cpu", "reduce-overhead")]
    assert float(cli[0]["steps/s"]) > 0 and math.isfinite(float(cli[0]["loss at end"])) and cli[0]["note"] == ""
    assert cli[1]["note"] == "CUDA only (CUDA graphs)"
    assert f"2-core CPU: {gpu.CPU_DEFAULT_RUN_STEPS_S:g} steps/s" in text
    (unet,) = [v for k, v in found.items() if k.startswith("## unet-32")]
    assert [(r["precision"], r["channels_last"], r["compile"]) for r in unet] == [
        ("fp32", "off", "off"), ("bf16", "off", "off"), ("bf16", "on", "off"), ("bf16", "on", "on")]
    assert all(r["note"] == "" and float(r["img/s"]) > 0 for r in unet)
    (sampling,) = [v for k, v in found.items() if k.startswith("## Compiled sampling")]
    assert [r["network"] for r in sampling] == ["eager", "compiled"]
    assert all(r["note"] == "" and float(r["img/s"]) > 0 for r in sampling)
    for key, n in (("side", 4), ("cli", 2), ("unet", 4), ("sample_side", 2)):
        assert len(rows[key]) == n
    assert all(math.isfinite(r["loss"]) for r in rows["side"] + rows["unet"])


def test_sections_are_chosen_and_checked():
    rc, text = run(["--smoke", "--device", "cpu", "--sections", "cli", "--max-minutes", "0"])
    assert rc == 0 and "## Default CLI run" in text and "## Side by side" not in text and "## Training" not in text
    with pytest.raises(SystemExit):
        gpu.parse(["--smoke", "--sections", "side,fast"])


def test_analytic_flops_match_flop_counter():
    """The analytic count is exact for the forward and within a few % of FlopCounterMode for
    forward + backward (the backward skips the input gradients of patchify and the noise MLP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = gpu.build_model("dit-b2", dict(input_size=8, hidden_size=48, depth=3, num_heads=3, mlp_ratio=2.0),
                            (4, 8, 8), torch.device("cpu"))
    batch = gpu.make_batches(model, 2, (4, 8, 8), torch.device("cpu"), count=1)[0]
    fwd = gpu.dit_forward_flops(model.net)
    x, c = torch.randn(2, 4, 8, 8), torch.zeros(2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.net(x, c, emb=torch.randn(2, model.net.emb_dim))
    assert counter.get_total_flops() == 2 * fwd
    train = gpu.counted_train_flops(model, batch)
    assert train == pytest.approx(3 * fwd, rel=0.03) and train <= 3 * fwd


def test_sdpa_backend_from_profiler_names():
    assert gpu.sdpa_backends({"aten::_scaled_dot_product_flash_attention", "aten::mm",
                              "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>"})[0] == "flash"
    assert gpu.sdpa_backends({"aten::_scaled_dot_product_efficient_attention",
                              "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)",
                              "aten::_scaled_dot_product_efficient_attention_backward"})[0] == "efficient"
    # cuDNN's kernel names say "flash" too: the cuDNN op decides
    assert gpu.sdpa_backends({"aten::_scaled_dot_product_cudnn_attention", "cudnn_convolution",
                              "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3"})[0] == "cudnn"
    assert gpu.sdpa_backends({"aten::_scaled_dot_product_attention_math", "aten::bmm"})[0] == "math"
    assert gpu.sdpa_backends({"aten::_scaled_dot_product_flash_attention_for_cpu",
                              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})[0] == "flash (CPU)"
    assert gpu.sdpa_backends({"aten::mm", "aten::softmax"})[0] == "?"


def test_peak_table():
    assert gpu.peak_bf16("NVIDIA H100 80GB HBM3")[0] == 989.4e12
    assert gpu.peak_bf16("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu.peak_bf16("NVIDIA H200")[0] == 989.4e12
    assert gpu.peak_bf16("NVIDIA A100-SXM4-80GB")[0] == 312e12
    peak, why = gpu.peak_bf16("NVIDIA GeForce RTX 4090")
    assert peak is None and "unknown device" in why


def test_wall_time_guard_skips_rows():
    rc, text = run(["--smoke", "--device", "cpu", "--models", "s2", "--max-minutes", "0"])
    assert rc == 0
    found = tables(text)
    rows = [r for k, v in found.items() if k.startswith(("## Training", "## Sampling")) for r in v]
    assert len(rows) == 5 and all("wall-time guard" in r["note"] for r in rows)
    new = [r for k, v in found.items() if k.startswith(("## Side", "## Default CLI", "## unet", "## Compiled"))
           for r in v]
    assert len(new) == 12 and all("wall-time guard" in r["note"] or r["note"] == "CUDA only (CUDA graphs)" for r in new)


def test_without_cuda_it_says_so_and_exits_2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, text = run([])
    assert rc == 2 and text.strip() == gpu.NO_CUDA
