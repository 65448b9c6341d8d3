"""Every command in the docs' code blocks (README.md, docs/*.md, launch/README.md, DEVELOPERS.md) is checked
against the code, so docs and code cannot drift apart: dbot-pretrain commands (under any launcher) are parsed and
their config built and validated; dbot-bench, dbot-shards, dbot-export, dbot-eval and fine-tuning arguments go
through the tools' own argument parsers (nothing runs); dbot-plan runs (pure arithmetic); scripts under launch/
exist and pass `bash -n`. Also: the README links every docs/ page, every relative link resolves, docs/recipes.md's
preset table is what the presets resolve to, and CPU runs build DeepSpeed's ops in a folder of this environment's
own."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"^[A-Z_]+=")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(source line, argv) for every command in the docs' bash blocks; continuation lines joined, comments cut."""
    out = []
    for doc in DOCS:
        blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split(" && "):
                    argv = shlex.split(part, comments=True)
                    while argv and ASSIGNMENT.match(argv[0]):
                        argv = argv[1:]
                    if argv:
                        out.append((line.strip(), argv))
    return out


class _Parsed(Exception):
    pass


def parse_only(cli, argv: list[str]) -> argparse.Namespace:
    """Run a tool's argument parsing and stop there (argparse errors exit with the tool's message)."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        cli(argv)
    except _Parsed as done:
        return done.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{argv} never parsed its arguments")


def after_module(argv: list[str], module: str) -> list[str] | None:
    """The arguments after `--module X` / `-m X` (launchers), or None if `module` is not what runs."""
    for flag in ("--module", "-m"):
        if flag in argv and argv[argv.index(flag) + 1] == module:
            return argv[argv.index(flag) + 2:]
    return None


def check(argv: list[str]) -> str:
    """Check one documented command; returns what kind of check ran."""
    from dbot_ds import pretrain
    from dbot_ds.bench import cli as bench
    from dbot_ds.checkpoint import export_cli as export
    from dbot_ds.config import load_config
    from dbot_ds.data import shards
    from dbot_ds.evaluate import cli as evaluate
    from dbot_ds.evaluate import finetune
    from dbot_ds.plan import memory as plan
    prog = argv[0]
    if prog in ("pip", "cp", "grep") or argv[:3] == ["python", "-m", "pytest"]:
        return "skipped"
    if prog == "sbatch":                                                # sbatch [options] SCRIPT
        script = ROOT / argv[-1].removeprefix("./")
        assert script.is_file(), f"{script} missing"
        subprocess.run(["bash", "-n", str(script)], check=True)
        return "script"
    if prog.startswith(("./launch/", "launch/")):
        script = ROOT / prog.removeprefix("./")
        assert script.exists() and os.access(script, os.X_OK), f"{script} missing or not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
        return "script"
    tools = {"dbot-pretrain": ("dbot_ds.pretrain", None), "dbot-bench": ("dbot_ds.bench", bench.cli),
             "dbot-shards": ("dbot_ds.data.shards", shards.cli), "dbot-export": ("dbot_ds.checkpoint.export", export.cli),
             "dbot-plan": ("dbot_ds.plan.memory", plan.cli), "dbot-eval": ("dbot_ds.evaluate", evaluate.cli),
             "python -m dbot_ds.finetune": ("dbot_ds.finetune", finetune.cli)}
    for name, (module, cli) in tools.items():
        args = argv[1:] if prog == name else after_module(argv, module)
        if args is None:
            continue
        if "--config_file" in argv:                                    # accelerate launch --config_file FILE
            assert (ROOT / argv[argv.index("--config_file") + 1]).exists()
        if name == "dbot-pretrain":
            a = pretrain.parse_args(args)
            load_config(path=a.config, preset=a.preset, overrides=a.overrides)
            return "config"
        if name == "dbot-plan":
            assert cli(args) == 0
            return "ran"
        parse_only(cli, args)
        return "parsed"
    raise AssertionError(f"the docs show a command this test does not know how to check: {argv}")


COMMANDS = doc_commands()


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[" ".join(a)[:80] for _, a in COMMANDS])
def test_documented_command_matches_the_code(line, argv, capsys):
    assert check(argv) in ("skipped", "script", "config", "ran", "parsed"), line


def test_the_docs_show_every_tool():
    progs = {a[0] for _, a in COMMANDS} | {m for _, a in COMMANDS for m in a if m.startswith("dbot_ds.")}
    for tool in ("dbot-pretrain", "dbot-shards", "dbot-bench", "dbot-plan", "dbot-export", "dbot-eval",
                 "dbot_ds.pretrain"):
        assert tool in progs, tool
    assert any(a[:2] == ["dbot-bench", "fixture"] for _, a in COMMANDS), "dbot-bench fixture is not documented"


def test_a_wrong_flag_would_be_caught():
    from dbot_ds.bench import cli as bench
    with pytest.raises(SystemExit):
        parse_only(bench.cli, ["step", "--micro-batchh", "4"])


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no page"
    for page in pages:
        assert f"](docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_relative_links_resolve():
    for doc in [*DOCS, ROOT / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path):
                assert (doc.parent / path).exists(), f"{doc.relative_to(ROOT)} links {target}, which does not exist"


def preset_table() -> list[str]:
    """docs/recipes.md's preset table as the presets resolve today (load_config), one markdown line per row."""
    from dbot_ds.config import load_config, preset_names

    def num(x: float) -> str:
        if not x or abs(x) >= 1e-3:
            return f"{x:.15g}"
        mantissa, exponent = f"{x:.15e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"

    lines = ["| preset | arch | student, mask | teacher | stage epochs | warmup epochs | global / micro batch | blr "
             "| clip_grad | drop_path | loss | precision |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in preset_names():
        c = load_config(preset=name)
        t = c.teacher
        teacher = {"bootstrap": f"bootstrap, stage 0 depth {t.init_depth}", "vit": f"vit ({t.arch})"}.get(t.source, t.source)
        cells = [f"`{name}`", c.model.arch, f"{c.model.student}, {c.model.mask}", teacher,
                 ", ".join(num(e) for e in c.schedule.stage_epochs), num(c.schedule.warmup_epochs),
                 f"{c.optim.global_batch} / {c.optim.micro_batch}", num(c.optim.blr), num(c.optim.clip_grad),
                 num(c.model.drop_path), c.objective.loss, c.optim.precision]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def test_the_recipes_page_shows_what_the_presets_set():
    expected = preset_table()
    page = (ROOT / "docs" / "recipes.md").read_text().splitlines()
    start = page.index(expected[0]) if expected[0] in page else None
    assert start is not None, "docs/recipes.md lost its preset table; it should be:\n" + "\n".join(expected)
    assert page[start:start + len(expected)] == expected and not page[start + len(expected)].startswith("|"), \
        "docs/recipes.md's preset table differs from the presets; it should be:\n" + "\n".join(expected)


def test_deepspeed_ops_build_in_a_folder_of_this_environments_own():
    code = "import os, dbot_ds; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    folder = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "dbot_ds/torch_extensions/" in folder and not folder.strip().endswith("torch_extensions")
    env["TORCH_EXTENSIONS_DIR"] = "/elsewhere"                          # the user's own choice wins
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "/elsewhere"
