"""The `tiermap` command, tried as a new user would: every subcommand and every exit code."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiermap
from tiermap.cli import main, parse_arg_spec

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> tuple[int, str, str]:
    """Run `tiermap ARGV` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    """A user's model file with a builder, a plain function and a few broken ones."""
    return write(tmp_path / "model.py", """
        import jax
        import jax.numpy as jnp

        def mlp(x, w):
            return jax.nn.relu(x @ w)

        def build():
            spec = jax.ShapeDtypeStruct
            return mlp, (spec((64, 128), jnp.float32), spec((128, 256), jnp.float32))

        def build_with_kwargs():
            spec = jax.ShapeDtypeStruct((64, 64), jnp.float32)
            return (lambda x, *, scale: x * scale), (spec,), {"scale": spec}

        def broken_builder():
            raise ValueError("config file missing: cfg.yaml")

        def bad_fn(x):
            raise RuntimeError("shapes are wrong in the user's model")

        def build_bad_fn():
            return bad_fn, (jax.ShapeDtypeStruct((4,), jnp.float32),)

        def not_a_builder():
            return 42

        VALUE = 3
        """)


# --- usage and bad input: exit 2 -----------------------------------------------------------------


def test_no_command_is_a_usage_error() -> None:
    code, _, err = run()
    assert code == 2
    assert "tiermap: error:" in err and "Traceback" not in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "compile" in capsys.readouterr().out


def test_missing_file(tmp_path: Path) -> None:
    code, _, err = run("compile", str(tmp_path / "nope.py") + ":build", "--target", "cpu")
    assert code == 2
    assert err.startswith("tiermap: error: ") and "no such file" in err


def test_missing_mlir_file(tmp_path: Path) -> None:
    code, _, err = run("compile", str(tmp_path / "nope.mlir"), "--target", "cpu")
    assert code == 2 and "no such file" in err


def test_program_without_a_name(user_file: Path) -> None:
    code, _, err = run("compile", str(user_file), "--target", "cpu")
    assert code == 2 and "FILE.py:NAME" in err


def test_unknown_function_lists_the_functions_there(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:buld", "--target", "cpu")
    assert code == 2
    assert "no function 'buld'" in err and "build" in err and "mlp" in err


def test_name_that_is_not_a_function(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:VALUE", "--target", "cpu")
    assert code == 2 and "not a function" in err


def test_unknown_target_lists_the_known_ones(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:build", "--target", "a101")
    assert code == 2
    assert "unknown target 'a101'" in err
    for name in tiermap.targets():
        assert name in err
    assert "Traceback" not in err


def test_target_file_with_typos_names_each_key(user_file: Path, tmp_path: Path) -> None:
    bad = write(tmp_path / "typo.toml", """
        name = "typo"
        platform = "cpu"
        [compute]
        peak_flops_per_s = { f32 = 1e12 }
        units = 4
        [[tiers]]
        name = "dram"
        capacty_bytes = 1_000_000
        read_bytes_per_s = 1e10
        write_bytes_per_sec = 1e10
        """)
    code, _, err = run("compile", f"{user_file}:build", "--target", str(bad))
    assert code == 2
    assert err.startswith("tiermap: error: ")
    assert "capacty_bytes" in err and "write_bytes_per_sec" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["f32(1024,64)", "f32[1024,", "f32[a,b]", "[3]", "f32[3,,4]"])
def test_malformed_arg(user_file: Path, spec: str) -> None:
    code, _, err = run("compile", f"{user_file}:mlp", "--arg", spec, "--target", "cpu")
    assert code == 2
    assert "expected DTYPE[SHAPE]" in err or "empty dimension" in err


def test_unknown_arg_dtype(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:mlp", "--arg", "q7[3]", "--target", "cpu")
    assert code == 2 and "unknown dtype 'q7'" in err and "bf16" in err


def test_parse_arg_spec() -> None:
    import jax.numpy as jnp

    spec = parse_arg_spec("bf16[1024, 64]")
    assert spec.shape == (1024, 64) and spec.dtype == jnp.bfloat16
    assert parse_arg_spec("i32[]").shape == ()
    assert parse_arg_spec("float32[8]").dtype == jnp.float32


def test_user_builder_exception_is_shown_without_traceback(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:broken_builder", "--target", "cpu")
    assert code == 2
    assert "broken_builder() raised ValueError: config file missing: cfg.yaml" in err
    assert "(at model.py:" in err
    assert "Traceback" not in err


def test_user_function_exception_while_tracing(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:build_bad_fn", "--target", "cpu")
    assert code == 2
    assert "RuntimeError: shapes are wrong in the user's model" in err
    assert "(at model.py:" in err


def test_user_module_raising_at_import(tmp_path: Path) -> None:
    bad = write(tmp_path / "boom.py", """
        import os
        SETTINGS = os.environ["TIERMAP_TEST_UNSET_VARIABLE"]
        """)
    code, _, err = run("compile", f"{bad}:build", "--target", "cpu")
    assert code == 2
    assert "KeyError" in err and "while being imported" in err and "(at boom.py:3)" in err


def test_user_module_with_a_syntax_error(tmp_path: Path) -> None:
    bad = write(tmp_path / "syntax.py", "def build(:\n    pass\n")
    code, _, err = run("compile", f"{bad}:build", "--target", "cpu")
    assert code == 2 and "syntax error" in err and "syntax.py:1" in err


def test_builder_returning_the_wrong_thing(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:not_a_builder", "--target", "cpu")
    assert code == 2 and "returned int" in err and "(fn, args)" in err


def test_function_with_parameters_needs_args(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:mlp", "--target", "cpu")
    assert code == 2 and "takes parameters (x, w)" in err and "--arg" in err


def test_unsupported_mlir_module(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.mlir", "this is not MLIR\n")
    code, _, err = run("compile", str(bad), "--target", "cpu")
    assert code == 2 and "unsupported program" in err


def test_arg_with_an_mlir_module_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("compile", str(tmp_path / "m.mlir"), "--arg", "f32[2]", "--target", "cpu")
    assert code == 2 and "--arg applies to FILE.py:NAME" in err


def test_nonpositive_time_limit_is_a_usage_error(user_file: Path) -> None:
    code, _, err = run("compile", f"{user_file}:build", "--target", "cpu", "--time-limit-s", "0")
    assert code == 2 and "seconds > 0" in err


def test_subprocess_user_error_has_one_line_and_exit_2(user_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tiermap", "compile",
                           f"{user_file}:broken_builder", "--target", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tiermap: error: broken_builder() raised ValueError: config file missing: cfg.yaml "
        "(at model.py:17)"]
    assert proc.stdout == ""


# --- targets -------------------------------------------------------------------------------------


def test_targets_table_lists_every_builtin_with_tiers() -> None:
    code, out, _ = run("targets")
    assert code == 0
    for name in tiermap.targets():
        assert name in out
    for needle in ("sram", "hbm", "ddr", "flash", "capacity", "TB/s"):
        assert needle in out


def test_targets_json() -> None:
    code, out, _ = run("targets", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "tiermap.targets/v1"
    by_name = {t["name"]: t for t in doc["targets"]}
    assert sorted(by_name) == sorted(tiermap.targets())
    assert [t["name"] for t in by_name["sn40l"]["tiers"]] == ["sram", "hbm", "ddr"]
    tier = by_name["sn40l"]["tiers"][1]
    assert {"capacity_bytes", "read_bytes_per_s", "write_bytes_per_s", "per_unit"} <= tier.keys()


def test_targets_checks_a_target_file(tmp_path: Path) -> None:
    from tiermap.hardware import dumps_target

    good = tmp_path / "mine.toml"
    good.write_text(dumps_target(tiermap.target("a100")))
    code, out, _ = run("targets", str(good), "--json")
    assert code == 0 and json.loads(out)["targets"][0]["name"] == "a100"
    code, _, err = run("targets", "nonexistent-target")
    assert code == 2 and "unknown target" in err


# --- calibrate -----------------------------------------------------------------------------------


def test_calibrate_writes_a_loadable_target(tmp_path: Path) -> None:
    path = tmp_path / "cpu.toml"
    code, out, err = run("calibrate", "--quick", "-o", str(path))
    assert code == 0, err
    assert f"wrote {path}" in out
    target = tiermap.target(str(path))
    assert target.platform == "cpu" and target.tiers[-1].name == "dram"
    assert not list(tmp_path.glob("*.tmp"))


def _calibrated_cpu(tmp_path: Path, **changes: object) -> Path:
    """The built-in cpu target as a calibrated one (working-set model), with `changes`."""
    from dataclasses import replace

    from tiermap.hardware import dumps_target

    target = replace(tiermap.target("cpu"), name="cpu-test", working_set_tiers=True,
                     **changes)  # type: ignore[arg-type]
    path = tmp_path / "cpu-test.toml"
    path.write_text(dumps_target(target))
    return path


CHECK_FAST = ("--suite", "smoke", "--rounds", "1", "--repeats", "2", "--no-wait")


def test_calibrate_check_prints_predicted_vs_measured_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "fidelity.png"
    code, out, err = run("calibrate", "--check", "--target", str(_calibrated_cpu(tmp_path)),
                         *CHECK_FAST, "--plot", str(plot))
    assert code == 0, err
    for needle in ("cost model fidelity: smoke suite on cpu-test", "predicted", "measured 1",
                   "log2 err 2", "matmul", "64x128x32", "softmax", "sum rows",
                   "repeat 1: median |log2 err|", "repeat 2: median |log2 err|", "Spearman",
                   "worst", "goals"):
        assert needle in out, needle
    assert plot.stat().st_size > 0


def test_calibrate_check_strict_exits_4_when_a_goal_fails(tmp_path: Path) -> None:
    slow = _calibrated_cpu(tmp_path, peak_flops_per_s={"f32": 1e6})  # 10^5 x too slow
    code, out, err = run("calibrate", "--check", "--target", str(slow), *CHECK_FAST)
    assert code == 0, err  # without --strict the check reports and exits 0
    assert "goals NOT met" in out
    code, out, err = run("calibrate", "--check", "--target", str(slow), *CHECK_FAST, "--strict")
    assert code == 4, err
    assert "goals NOT met" in out


def test_calibrate_check_flags_need_check_and_a_cpu_target(tmp_path: Path) -> None:
    code, _, err = run("calibrate", "--target", "cpu")
    assert code == 2 and "--target needs --check" in err
    code, _, err = run("calibrate", "--check", "--target", "h100", *CHECK_FAST)
    assert code == 2 and "platform 'cuda'" in err
    code, _, err = run("calibrate", "--check", "--target", "cpu", "-o", str(tmp_path / "x"))
    assert code == 2 and "exclude each other" in err
    code, _, err = run("calibrate", "--check", "--target", "cpu", "--rounds", "0")
    assert code == 2 and "expected a number >= 1" in err


# --- compile: success and infeasible ------------------------------------------------------------

FAST = ("--time-limit-s", "2")
PLAN_KEYS = {"schema", "program", "target", "strategy", "ops", "tensors", "transfers",
             "predicted_time_s", "lower_bound_s", "traffic_bytes", "baselines", "solver"}


def test_compile_a_function_with_args_prints_the_summary(user_file: Path) -> None:
    code, out, err = run("compile", f"{user_file}:mlp", "--arg", "f32[64,128]",
                         "--arg", "f32[128,256]", "--target", "h100", *FAST)
    assert code == 0, err
    for needle in ("tiermap plan", "mlp", "h100", "naive", "greedy", "mip (this plan)",
                   "lower bound", "Tiers", "hbm", "capacity"):
        assert needle in out, needle
    assert err == ""  # no progress display when stderr is not a terminal


def test_compile_a_builder_with_kwargs_and_json_summary(user_file: Path) -> None:
    code, out, err = run("compile", f"{user_file}:build_with_kwargs", "--target", "cpu",
                         "--strategy", "greedy", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["schema"] == "tiermap.summary/v1"
    assert summary["strategy"] == "greedy" and summary["target"] == "cpu"
    assert summary["predicted_time_s"] >= summary["lower_bound_s"] > 0
    assert summary["outputs"] == {}


def test_compile_writes_each_requested_output(user_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "o"
    code, out, err = run("compile", f"{user_file}:build", "--target", "sn40l", *FAST,
                         "-o", str(out_dir / "p.json"), "--mlir", str(out_dir / "a.mlir"),
                         "--trace", str(out_dir / "t.json"), "--report", str(out_dir / "r.md"),
                         "--plots", str(out_dir / "charts"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["outputs"]["plan"] == str(out_dir / "p.json")
    plan = json.loads((out_dir / "p.json").read_text())
    assert plan["schema"] == "tiermap.plan/v2" and PLAN_KEYS <= plan.keys()
    assert plan["target"]["name"] == "sn40l" and plan["program"]["name"] == "mlp"
    assert {"id", "shape", "dtype", "nbytes", "producer_step", "last_use_step", "materialized",
            "residency"} <= plan["tensors"][0].keys()
    assert {"id", "kind", "step", "flops", "inputs", "outputs", "fusion_group",
            "predicted_time_s", "bytes_by_tier"} <= plan["ops"][0].keys()
    assert tiermap.Plan.from_json((out_dir / "p.json").read_text()).strategy == "mip"
    mlir = (out_dir / "a.mlir").read_text()
    assert "stablehlo.dot_general" in mlir and "tiermap." in mlir
    trace = json.loads((out_dir / "t.json").read_text())
    assert any(e["ph"] == "X" and e["cat"] == "op" for e in trace["traceEvents"])
    assert (out_dir / "r.md").read_text().startswith("# tiermap plan: mlp on sn40l")
    for name in ("roofline.png", "occupancy.png", "timeline.png", "traffic.png"):
        assert (out_dir / "charts" / name).stat().st_size > 5_000
    assert not list(out_dir.rglob("*.tmp"))


def test_compile_report_lists_the_plan_decisions_as_applied(tmp_path: Path) -> None:
    model = write(tmp_path / "gpt.py", """
        from tiermap.examples import models

        def build():
            return models.transformer_train(layers=1, d_model=64, heads=2, seq=64, batch=2,
                                            vocab=128)
        """)
    report = tmp_path / "r.md"
    code, out, err = run("compile", f"{model}:build", "--target", "h100", *FAST,
                         "--report", str(report), "--json")
    assert code == 0, err
    decisions = json.loads(out)["decisions"]
    assert decisions and {d["kind"] for d in decisions} == {"attention"}
    text = report.read_text()
    assert "## Plan decisions as applied" in text
    for d in decisions:  # the report lists the same decisions as the summary
        assert f"| {d['kind']} | `{d['subject']}` | {'yes' if d['applied'] else '**no**'} |" \
            in text
    code, out, err = run("compile", f"{model}:build", "--target", "h100", *FAST)
    assert code == 0, err
    assert "plan decisions as applied: attention 1 applied, 0 not" in out


def test_out_dir_writes_everything(user_file: Path, tmp_path: Path) -> None:
    code, out, err = run("compile", f"{user_file}:build", "--target", "cpu", *FAST,
                         "--out-dir", str(tmp_path / "out"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["annotated.mlir", "occupancy.png", "plan.json", "report.md",
                     "roofline.png", "timeline.png", "trace.json", "traffic.png"]
    assert f"wrote plan            {tmp_path / 'out' / 'plan.json'}" in out
    traffic = (tmp_path / "out" / "traffic.png").read_bytes()
    assert traffic.startswith(b"\x89PNG")


def test_compile_an_mlir_module(tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp

    spec = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    text = jax.jit(lambda a, b: jnp.exp(a @ b)).lower(spec, spec).as_text()
    module = tmp_path / "module.mlir"
    module.write_text(text)
    code, out, err = run("compile", str(module), "--target", "tpu-v5e", "--strategy", "naive",
                         "--mlir", str(tmp_path / "annotated.mlir"))
    assert code == 0, err
    assert "tpu-v5e" in out
    assert "tiermap." in (tmp_path / "annotated.mlir").read_text()


def test_a_program_that_does_not_fit_exits_3(user_file: Path, tmp_path: Path) -> None:
    tiny = write(tmp_path / "tiny.toml", """
        name = "tiny"
        description = "main memory smaller than one tensor of the program"
        platform = "cpu"

        [compute]
        peak_flops_per_s = { f32 = 1e9 }
        units = 1

        [[tiers]]
        name = "sram"
        capacity_bytes = 65536
        per_unit = true
        read_bytes_per_s = 1e10
        write_bytes_per_s = 1e10

        [[tiers]]
        name = "dram"
        capacity_bytes = 8192
        read_bytes_per_s = 1e9
        write_bytes_per_s = 1e9
        """)
    code, out, err = run("compile", f"{user_file}:mlp", "--arg", "f32[64,64]",
                         "--arg", "f32[64,64]", "--target", str(tiny))
    assert code == 3
    assert out == ""
    assert err.startswith("tiermap: error: does not fit: ")
    assert "16384 bytes" in err and "dram" in err   # what does not fit, and where
    assert "Traceback" not in err


def test_compile_with_the_capacity_bound(user_file: Path, tmp_path: Path) -> None:
    # the starved benchmark target with 192 KiB of HBM: the mlp's tensors cannot all stay there
    src = (Path(__file__).parents[2] / "benchmarks" / "targets" / "a100-256m.toml").read_text()
    assert "capacity_bytes = 268_435_456" in src
    small = tmp_path / "a100-192k.toml"
    small.write_text(src.replace("capacity_bytes = 268_435_456", "capacity_bytes = 196_608"))
    bounds = {}
    for flag in ((), ("--capacity-bound",)):
        out_json = tmp_path / f"plan{len(flag)}.json"
        code, _out, err = run("compile", f"{user_file}:mlp", "--arg", "f32[64,128]",
                              "--arg", "f32[128,256]", "--target", str(small), *FAST,
                              *flag, "-o", str(out_json))
        assert code == 0, err
        plan = json.loads(out_json.read_text())
        assert plan["predicted_time_s"] >= plan["lower_bound_s"]
        bounds[bool(flag)] = plan["lower_bound_s"]
        if flag:
            assert any("capacity LP" in note for note in plan["notes"]), plan["notes"]
    assert bounds[True] >= bounds[False]


def test_compile_plans_as_it_runs_and_checks_compiled_memory(tmp_path: Path) -> None:
    """An attention the applied program leaves to XLA (its probabilities are read elsewhere):
    the CLI keeps the plan made again without it, lists it as planned away in the report and
    the summary, and with --memory-check compares the plan's peak with XLA's."""
    model = write(tmp_path / "reg.py", """
        import jax
        import jax.numpy as jnp

        def step(ws, x):
            def loss(w):
                q, k, v = ((x @ w[i]).reshape(2, 128, 2, 32) for i in range(3))
                s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(32.0).astype(x.dtype)
                p = jax.nn.softmax(s, axis=-1)
                out = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(2, 128, 64)
                return jnp.sum(out ** 2) + 1e-3 * jnp.sum(p * p)
            value, grad = jax.value_and_grad(loss)(ws)
            return value, ws - 1e-2 * grad

        def build():
            spec = jax.ShapeDtypeStruct
            return step, (spec((3, 64, 64), jnp.float32), spec((2, 128, 64), jnp.float32))
        """)
    report, plan_json = tmp_path / "r.md", tmp_path / "p.json"
    code, out, err = run("compile", f"{model}:build", "--target", "h100", *FAST,
                         "--report", str(report), "-o", str(plan_json), "--memory-check",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    away = [d for d in summary["decisions"] if not d["priced"]]
    assert [(d["kind"], d["applied"]) for d in away] == [("attention", False)]
    assert json.loads(plan_json.read_text())["decisions"] == summary["decisions"]
    check = summary["memory_check"]
    assert check["compiled_peak_bytes"] > 0 and check["predicted_peak_bytes"] > 0
    text = report.read_text()
    assert "no (planned without it)" in text and "## Predicted against compiled" in text
    assert any("planned as it runs" in n for n in json.loads(plan_json.read_text())["notes"])
