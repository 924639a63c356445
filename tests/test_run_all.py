"""benchmarks/run_all.py: a quick run of one small benchmark writes the document; a failing
benchmark is reported in it and makes the exit code 1."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def _module():
    spec = importlib.util.spec_from_file_location("bnfold_run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_quick_run_of_one_benchmark_writes_the_document(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--only", "fold_bench", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = output.read_text()
    assert "Smoke run (`--quick`)" in text
    assert "Ratios are measured side by side" in text
    assert "`python benchmarks/run_all.py --quick --only fold_bench --output " in text
    for key in (
        "| CPU |",
        "| cores |",
        "| RAM |",
        "| OS |",
        "| python |",
        "| torch |",
        "| onnx |",
        "| onnxruntime |",
        "| bnfold |",
    ):
        assert key in text, key
    assert "| [fold_bench](#fold_bench) | ok |" in text
    assert "## fold_bench" in text
    assert "`python benchmarks/fold_bench.py --repeat 1 --models mlp traps`" in text
    assert "| traps | 3 |" in text  # the benchmark's own table, verbatim


def test_every_benchmark_has_quick_arguments_or_a_smoke_flag() -> None:
    run_all = _module()
    for script in run_all.discover(None):
        quick = run_all.arguments(script, quick=True)
        assert quick, f"{script.name}: add its --quick arguments to ARGS in run_all.py"


def test_a_failing_benchmark_is_reported() -> None:
    run_all = _module()
    good = run_all.Result("a_bench", "A.", ["python", "a.py"], 1.0, 0, "| x |\n|---|\n| 1 |\n", "")
    crashed = run_all.Result("b_bench", "B.", ["python", "b.py"], 2.0, 1, "", "Traceback\nBoom")
    silent = run_all.Result("c_bench", "C.", ["python", "c.py"], 3.0, 0, "no table", "")
    assert good.ok and not crashed.ok and not silent.ok
    text = run_all.document([good, crashed, silent], [], False, "today", 6.0, "1.00")
    assert "| [b_bench](#b_bench) | FAILED (exit 1) |" in text
    assert "| [c_bench](#c_bench) | FAILED (no Markdown table) |" in text
    assert "Boom" in text
    assert "Smoke run" not in text


def test_readme_tables_are_refreshed_from_a_full_run() -> None:
    run_all = _module()
    fold = run_all.Result(
        "fold_bench",
        "F.",
        ["python", "benchmarks/fold_bench.py"],
        1.0,
        0,
        "intro\n\n| model | ratio |\n|---|---|\n| mlp | 0.99 |\n\nafter\n",
        "",
    )
    failed = run_all.Result("cli_bench", "C.", ["python", "c.py"], 1.0, 1, "| x |\n", "boom")
    readme = (
        "text\n<!-- bench:fold_bench -->\nold table\n<!-- /bench:fold_bench -->\n"
        "<!-- bench:cli_bench -->\nkept\n<!-- /bench:cli_bench -->\n"
    )
    refreshed = run_all.refresh_readme(readme, [fold, failed], "abc123")
    assert (
        "<!-- bench:fold_bench -->\n| model | ratio |\n|---|---|\n| mlp | 0.99 |\n\n"
        "(`python benchmarks/fold_bench.py`, commit abc123)\n<!-- /bench:fold_bench -->"
        in refreshed
    )
    assert "old table" not in refreshed
    assert "<!-- bench:cli_bench -->\nkept\n" in refreshed  # a failed run leaves its table


def test_readme_marks_the_tables_the_issues_ask_for() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("fold_bench", "recalibrate_bench"):
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        assert start in readme and end in readme, name
        assert "|---|" in readme.split(start)[1].split(end)[0], name


def test_the_document_says_how_to_run_the_scripts_run_all_skips() -> None:
    run_all = _module()
    text = run_all.document([], [], False, "today", 1.0, "1.00", "abc123")
    assert "python benchmarks/kernels_left.py" in text
    assert (ROOT / "benchmarks" / "kernels_left.py").exists()
    assert run_all.OTHER_SCRIPTS.strip() in (ROOT / "BENCHMARKS.md").read_text()


def test_a_run_of_some_benchmarks_never_replaces_the_whole_document(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """``--only`` without ``--output`` prints its document: BENCHMARKS.md keeps every other
    benchmark's tables (and the README its quoted ones)."""
    run_all = _module()
    document, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    document.write_text("every benchmark\n")
    readme.write_text("readme\n")
    monkeypatch.setattr(run_all, "DEFAULT_OUTPUT", document)
    monkeypatch.setattr(run_all, "README", readme)
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    fake = lambda script, args, timeout: run_all.Result(  # noqa: E731
        script.stem, script.stem, ["python", script.name], 0.1, 0, table, ""
    )
    monkeypatch.setattr(run_all, "run", fake)
    assert run_all.main(["--only", "fold_bench"]) == 0
    assert document.read_text() == "every benchmark\n" and readme.read_text() == "readme\n"
    assert "## fold_bench" in capsys.readouterr().out
