"""sd.bench and sd.gpu_check at tiny scale on CPU: the code that runs on the GPU, with its counts pinned.

The JSONs go to tmp folders: CPU timings of the tiny pipeline are smoke numbers, not results.
"""
import json

import pytest
import torch

pytest.importorskip("diffusers")
from sd import bench, gpu_check  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """python -m sd.bench --device cpu --tiny, small: (its JSON, what it printed)."""
    import contextlib
    import io
    out, printed = tmp_path_factory.mktemp("bench"), io.StringIO()
    (out / "prompts.txt").write_text("a red fox in snow\na bowl of ramen\n")
    with contextlib.redirect_stdout(printed):
        assert bench.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--batch_size", "4",
                           "--out", str(out), "--teacher_substeps", "2", "--prompts_file", str(out / "prompts.txt")]) == 0
    return json.loads((out / "bench-cpu-tiny.json").read_text()), printed.getvalue()


def test_bench_prints_the_table_and_writes_the_json(bench_run):
    rec, printed = bench_run
    assert list(rec["results"]) == list(bench.VARIANTS)
    for name, r in rec["results"].items():
        assert name in printed and r["median_ms"] > 0 and r["model_tflop_per_s"] > 0
        assert r["peak_gib"] is None and r["mfu"] is None  # CPU: no CUDA memory, no known peak
    rat = rec["ratios"]
    assert set(rat["speedup_vs_reference_median"]) == {"lcm", "lcm_ddil"} and "ddil_overhead_median" in rat
    assert "speedup_vs_reference_median" in printed and rec["targets"] is None  # targets: full scale only
    assert rec["unet_gflop_per_sample"] > 0 and rec["device"] == "cpu"


def test_bench_counts_the_unet_evaluations_of_each_step(bench_run):
    """Plain LCM, reference-style or ddil's: 2 teacher (cond, uncond), 1 target and 1 student evaluation per state,
    the student's with its backward (6 forward-equivalents in all). DDIL's rollouts add teacher and student evaluations."""
    res, flops = bench_run[0]["results"], bench_run[0]["unet_gflop_per_sample"] * 1e9
    for name in ("reference", "lcm"):
        assert res[name]["unet_evals_per_state"] == {"student": 1.0, "target": 1.0, "teacher": 2.0}
        assert res[name]["model_tflop_per_step"] * 1e12 == pytest.approx(6 * 4 * flops)
    ddil_evals = res["lcm_ddil"]["unet_evals_per_state"]
    assert ddil_evals["teacher"] > 2.0 and ddil_evals["target"] == 1.0
    assert bench_run[0]["ratios"]["ddil_overhead_flops"] > 0


def test_unet_counter_weighs_backward():
    net = torch.nn.Linear(3, 3)
    counter = bench.UNetCounter()
    counter.watch("net", net)
    x = torch.randn(5, 3)
    with torch.no_grad():
        net(x)  # 1 per sample
    net(x)  # with a backward into its weights: 3 per sample
    net.requires_grad_(False)
    net(x.requires_grad_())  # backward to its input only: 2 per sample
    assert counter.evals["net"] == 15 and counter.fwd_equiv == 5 * (1 + 3 + 2)
    counter.close()
    net(x)
    assert counter.evals["net"] == 15


def test_mean_mix_step_is_where_beta_mix_meets_its_run_mean():
    cfg = bench.sd_config({"max_train_steps": 1000, "beta_mix_steps": 500})
    assert bench.mean_mix_step(cfg) == 375  # beta_mix 1 -> 0 over 500 of 1000 steps: mean 0.25
    assert bench.mean_mix_step(bench.sd_config({"max_train_steps": 100, "beta_mix_steps": 0})) == 0


def test_regional_compile_wraps_every_repeated_block():
    """--compile: each transformer and ResNet block is compiled in place (lazily: tracing starts at its first call;
    the end-to-end compiled run is the GPU's, too slow for a CPU test), nothing else."""
    from sd import tiny
    unet = tiny.build_pipeline(tiny.TINY_UNET, tiny.TINY_VAE, tiny.TINY_TEXT).unet
    blocks = [m for m in unet.modules() if type(m).__name__ in bench.REPEATED_BLOCKS]
    assert bench.compile_blocks(unet, "eager") == len(blocks) > 0
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == blocks


def test_gpu_check_at_tiny_scale(tmp_path):
    """make sd-gpu-check's code on CPU: every method, without and with gradient checkpointing, trains and samples
    (sd.train flags after the check's own: two prompts of teacher data, one fake update, one teacher substep)."""
    out, prompts = tmp_path / "gpu-check.json", tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\na bowl of ramen\n")
    assert gpu_check.main(["--device", "cpu", "--tiny", "--steps", "1", "--batch_size", "2", "--out", str(out),
                           "--prompts_file", str(prompts), "--data_num_inference_steps", "1", "--fake_updates", "1",
                           "--teacher_substeps", "1"]) == 0
    rec = json.loads(out.read_text())
    runs = {(r["method"], r["gradient_checkpointing"]): r for r in rec["runs"]}
    assert set(runs) == {(m, c) for m in gpu_check.METHODS for c in (False, True)}
    for (method, _), r in runs.items():
        assert r["ms_per_step"] > 0 and r["sample"]["ok"] and r["sample"]["size"][:3] == [2, 16, 16]
        assert r["unet_evals_per_state"]["teacher"] >= 2 and r["unet_evals_per_state"]["student"] >= 1
        assert all(v == v for v in r["last_losses"].values())  # finite, not NaN
    assert runs[("dmd2", False)]["unet_evals_per_state"]["fake"] > 0 and "loss_fake" in runs[("dmd2", True)]["last_losses"]


@pytest.mark.parametrize("main", [bench.main, gpu_check.main])
def test_help(main, capsys):
    assert main(["--help"]) == 0
    assert "Any other flag is an sd.train flag" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expect", [
    (["--steps", "0"], "--steps 0"),
    (["--resolution", "20"], "--resolution 20"),
    (["--teacher_substeps", "0"], "teacher_substeps"),  # an sd.train flag, checked as sd.train checks it
    (["--no_such_flag", "1"], "unrecognized arguments"),
])
@pytest.mark.parametrize("main", [bench.main, gpu_check.main])
def test_bad_input_is_one_line(main, argv, expect, tmp_path, capsys):
    assert main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "x.json"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert not any(tmp_path.iterdir())
