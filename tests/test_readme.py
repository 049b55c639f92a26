"""The README's commands, as written after its set-up line, on the tiny config.

Placeholders become real things: every config file the tiny config (configs/mnist_cond.py
the tiny config with the digits' 10 classes), DIR and runs/mnist one trained workdir,
runs/mnist_cond a conditional one, other paths temporary ones. Commands that need the FID
weights (fetched from the network) or minutes of timing are checked as far as that is
possible offline.
"""

import os
import re
import shlex

import pytest

from helpers import REPO, run

README = os.path.join(REPO, "README.md")
PYTHON = ".venv/bin/python"


def readme_commands() -> list[str]:
    """Every `.venv/bin/python ...` command of the README's bash blocks, comments dropped;
    of a set-up line (`python3 -m venv .venv && ... && COMMAND`), its last command."""
    with open(README) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = line.split("&& ")[-1]
            if line.startswith(PYTHON):
                commands.append(line)
    return commands


def recipes() -> list[str]:
    """The flags of the README's table of earlier projects' recipes."""
    with open(README) as f:
        section = f.read().split("### The earlier projects' recipes")[1].split("###")[0]
    return re.findall(r"\| `(--config=[^`]+)` \|", section)


def needs_fid_weights(command: str) -> bool:
    return ("dcgan_jax.evaluate" in command or "eval.every" in command
            or " fid " in f"{command} ")


def as_tiny(command: str, workdir: str, scratch: str) -> list[str]:
    args = shlex.split(command)[1:]
    args = [a for a in args if a not in ("[--config.FIELD=VALUE", "...]")]
    replaced = []
    for arg in args:
        conditional = arg == "--config=configs/mnist_cond.py"
        arg = re.sub(r"^--config=configs/\w+\.py$", "--config=tests/tiny_config.py", arg)
        arg = re.sub(r"^--workdir=runs/mnist_cond$", f"--workdir={workdir}_cond", arg)
        arg = re.sub(r"^--workdir=(DIR|runs/mnist)$", f"--workdir={workdir}", arg)
        arg = re.sub(r"^--out=(.+)$", lambda m: f"--out={os.path.join(scratch, m[1])}", arg)
        replaced.append(arg)
        if conditional:
            replaced.append("--config.model.num_classes=10")
    return replaced


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 20, commands
    workdir, scratch = str(tmp_path / "run"), str(tmp_path / "scratch")
    os.makedirs(scratch)
    ran, checked = [], []
    # Training first: the other commands read its workdir.
    for command in sorted(commands, key=lambda c: "dcgan_jax.main" not in c):
        if "-m pytest" in command:
            continue  # the command that runs this test
        if needs_fid_weights(command):
            checked.append(command)  # the weights come from the network; see test_evaluation
            continue
        args = as_tiny(command, workdir, scratch)
        if args[0].startswith("benchmarks/"):
            # Minutes of timing: check that every flag exists and parses (absl prints the
            # help after parsing them all, and exits with status 1).
            result = run([*args, "--helpshort"], check=False)
            output = result.stdout + result.stderr
            assert "Flags parsing error" not in output and "Traceback" not in output, output
            assert "flags:" in result.stdout, output
            checked.append(command)
            continue
        result = run(args, check=False, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert any("dcgan_jax.main" in c for c in ran) and any("dcgan_jax.sample" in c for c in ran)
    assert len([c for c in ran if "dcgan_jax.sample" in c]) == 11, ran
    figures = os.listdir(os.path.join(workdir, "figures"))
    for name in ("interpolate_step6_seed0_linear.png", "interpolate_step6_seed0_slerp.gif",
                 "grid_step6_seed1.png", "training.gif", "real_vs_fake_step6_seed0.png",
                 "losses.png"):
        assert name in figures, figures
    assert len(os.listdir(os.path.join(scratch, "fakes"))) == 10000
    conditional = os.listdir(os.path.join(f"{workdir}_cond", "figures"))
    assert any(name.startswith("classes") for name in conditional), conditional
    assert any("_class3" in name for name in conditional), conditional


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipes())
def test_earlier_projects_recipes_are_valid_configs(tmp_path, recipe):
    """Each recipe's fields and values pass validation; only its data is missing here."""
    args = shlex.split(recipe) + [f"--workdir={tmp_path}",
                                  f"--config.dataset=folder:{tmp_path / 'no_data'}"]
    result = run(["-m", "dcgan_jax.main", *args], check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].endswith(
        "does not exist or is not a folder"), result.stderr[-2000:]


def test_readme_is_parsed():
    assert len(recipes()) == 5
    assert all(c.startswith(PYTHON) for c in readme_commands())


def readme_generator_snippets() -> list[str]:
    """The Python blocks of the README's section on the exported generator."""
    with open(README) as f:
        section = f.read().split("## The generator outside dcgan_jax")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


# Put before a snippet: dcgan_jax and flax, though installed here, cannot be imported.
WITHOUT_DCGAN_JAX = """
import sys
class _Block:
    @staticmethod
    def find_spec(name, *args):
        if name.split(".")[0] in ("dcgan_jax", "flax"):
            raise ImportError(f"{name} is not installed")
sys.meta_path.insert(0, _Block)
"""
# Put after a snippet: its images, and what the process imported.
REPORT = """
import numpy
numpy.save("images.npy", numpy.asarray(images))
print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ("dcgan_jax", "flax")))
"""


@pytest.mark.slow
def test_readme_snippets_run_the_exported_generator_without_dcgan_jax(tmp_path):
    import numpy as np

    from dcgan_jax import exporters

    from test_export import save_run
    from tiny_config import tiny_config
    snippets = readme_generator_snippets()
    assert len(snippets) == 4
    save_run(tmp_path / "run", tiny_config(train__ema_decay=0.99))
    generator, state = exporters.restore_generator(str(tmp_path / "run"))
    exporters.export(generator, state, list(exporters.FILES), str(tmp_path / "generator"),
                     say=lambda line: None)
    z = np.random.default_rng(0).standard_normal((16, generator.nz), dtype=np.float32)
    expected = np.asarray(generator.function()(z))
    for snippet in snippets:
        result = run(["-c", WITHOUT_DCGAN_JAX + snippet + REPORT], cwd=str(tmp_path))
        assert result.stdout.strip().splitlines()[-1] == "imported []", result.stdout
        images = np.load(tmp_path / "images.npy")
        if "check.npz" in snippet:
            assert images.shape == (8, 32, 32, 1) and (tmp_path / "first.png").exists()
        else:
            np.testing.assert_allclose(images, expected, atol=1e-4, err_msg=snippet)
