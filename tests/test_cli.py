"""The ``dspark`` command line: dispatch, ``dspark generate`` output and error handling.

`dspark generate` runs in-process through `main([...])`; its token ids are compared with
transformers' greedy `generate()` on the tokenizer's encoding of each prompt. One subprocess run
checks the real console script (``.venv/bin/dspark`` once installed, else ``python -m``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark_cli import generate_cmd
from dspark_cli.main import COMMANDS, main, resolve
from dspark_jax.tokenizer import Tokenizer
from tests.helpers import EOS_ID, load_hf_model, xla_flags

PROMPTS = ["hello world", "the quick brown fox jumps"]
MAX_NEW = 12
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tiny_qwen3_dir):
    """prompt text -> transformers greedy continuation ids (stopping at the checkpoint's EOS)."""
    hf = load_hf_model(tiny_qwen3_dir)
    tok = Tokenizer.from_dir(tiny_qwen3_dir)
    cache: dict[str, list[int]] = {}

    def greedy(text: str) -> list[int]:
        if text not in cache:
            ids = tok.encode(text)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                  eos_token_id=[EOS_ID], pad_token_id=2)
            cache[text] = out[0, len(ids):].tolist()
        return cache[text]

    return greedy


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `dspark <argv>` run in-process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse --help / usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_matches_transformers(tiny_qwen3_dir, reference, capsys):
    argv = ["generate", "--target", str(tiny_qwen3_dir), "--max-new-tokens", str(MAX_NEW), "--json"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    doc = json.loads(out)  # exactly one JSON object and nothing else on stdout
    assert out.strip().count("\n") == 0
    assert set(doc) == {"results", "metrics"}
    assert [r["prompt"] for r in doc["results"]] == PROMPTS
    assert [r["token_ids"] for r in doc["results"]] == [reference(p) for p in PROMPTS]
    tok = Tokenizer.from_dir(tiny_qwen3_dir)
    assert [r["text"] for r in doc["results"]] == [tok.decode(r["token_ids"]) for r in doc["results"]]
    m = doc["metrics"]
    assert m["tokens"] == sum(len(r["token_ids"]) for r in doc["results"])
    for key in ("wall_s", "tokens_per_s", "compile_s", "load_s"):
        assert m[key] >= 0
    assert m["num_prompts"] == 2 and m["num_batches"] == 1 and m["mode"] == "autoregressive"
    assert "[dspark]" in err  # logs go to stderr


def test_prompts_file_batches_and_padding(tiny_qwen3_dir, reference, tmp_path, capsys):
    """3 JSONL prompts in batches of 2: the padded last batch reuses the program; outputs unchanged."""
    texts = PROMPTS + ["def f(x):"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"turns": [t, "second turn ignored"]}) for t in texts) + "\n\n")
    code, out, err = run_cli(["generate", "--target", str(tiny_qwen3_dir), "--prompts-file", str(path),
                              "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["prompt"] for r in doc["results"]] == texts
    assert [r["token_ids"] for r in doc["results"]] == [reference(t) for t in texts]
    assert doc["metrics"]["num_batches"] == 2
    assert doc["metrics"]["tokens"] == sum(len(reference(t)) for t in texts)  # padding rows not counted


def test_generate_human_readable(tiny_qwen3_dir, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    code, out, err = run_cli(["generate", "--target", str(tiny_qwen3_dir), "--prompts-file", str(path),
                              "--max-new-tokens", str(MAX_NEW), "--temperature", "0.8", "--top-k", "20",
                              "--seed", "3"], capsys)
    assert code == 0, err
    assert f"=== [0] {PROMPTS[0]}" in out and f"=== [1] {PROMPTS[1]}" in out
    assert "tok/s" in err and "tok/s" not in out


def test_generate_on_a_mesh_matches_single_device(tiny_qwen3_dir, reference):
    """--mesh 1,1,2 on 2 simulated CPU devices (subprocess: the device count is fixed at JAX start)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "dspark_cli.main", "generate", "--target", str(tiny_qwen3_dir),
            "--max-new-tokens", str(MAX_NEW), "--mesh", "1,1,2", "--json"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metrics"]["mesh"] == [1, 1, 2]
    assert [r["token_ids"] for r in doc["results"]] == [reference(p) for p in PROMPTS]


def test_generate_with_draft_is_lossless(tiny_qwen3_dir, reference, tmp_path, capsys):
    """--draft wires the speculative path; greedy speculative output == greedy target output."""
    import jax

    from dspark_jax.checkpoint.deepspec import save_draft
    from dspark_jax.config import load_hf_config
    from dspark_jax.draft.config import DraftConfig
    from dspark_jax.draft.model import init_draft_params
    from tests.helpers import MASK_ID

    tcfg = load_hf_config(tiny_qwen3_dir)
    dcfg = DraftConfig.from_target(tcfg, mask_token_id=MASK_ID, num_hidden_layers=1, block_size=3,
                                   target_layer_ids=(0, 1), markov_rank=16)
    save_draft(init_draft_params(dcfg, jax.random.PRNGKey(0)), dcfg, tmp_path / "draft", dtype="float32")
    argv = ["generate", "--target", str(tiny_qwen3_dir), "--draft", str(tmp_path / "draft"),
            "--max-new-tokens", str(MAX_NEW), "--json"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metrics"]["mode"] == "speculative"
    assert [r["token_ids"] for r in doc["results"]] == [reference(p) for p in PROMPTS]
    m = doc["metrics"]
    assert m["rounds"] > 0 and 1.0 <= m["acceptance_length"] <= 4 and len(m["accept_rate"]) == 3

    # --compare: speculative and autoregressive side by side, with a smaller block size.
    code, out, err = run_cli(argv + ["--compare", "--block-size", "2"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    m = doc["metrics"]
    assert m["greedy_outputs_equal"] is True and m["block_size"] == 2
    assert m["speedup"] > 0 and m["autoregressive_tokens_per_s"] > 0 and m["speculative_tokens_per_s"] > 0
    assert m["round_over_ar_step"] > 0
    assert [r["token_ids"] for r in doc["results"]] == [reference(p) for p in PROMPTS]
    code, out, err = run_cli(argv + ["--block-size", "9"], capsys)
    assert code == 2 and "block size 9 must be in [1, 3]" in err


def test_read_prompts_file_formats(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n{not json} second\n")
    assert generate_cmd.read_prompts_file(str(plain)) == ["first prompt", "{not json} second"]
    auto = tmp_path / "p.data"  # every line a {"turns": ...} record -> JSONL even without the suffix
    auto.write_text('{"turns": ["a", "b"]}\n{"turns": ["c"], "id": 3}\n')
    assert generate_cmd.read_prompts_file(str(auto)) == ["a", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["a"]}\n{"prompt": "x"}\n')
    with pytest.raises(generate_cmd.CliError, match=r"bad.jsonl:2: expected an object with a non-empty 'turns'"):
        generate_cmd.read_prompts_file(str(bad))
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        generate_cmd.read_prompts_file(str(tmp_path / "missing.txt"))


def test_parse_mesh():
    assert generate_cmd.parse_mesh("1,1,8") == (1, 1, 8)
    for bad in ("8", "1,1,0", "a,b,c", "1,2,3,4"):
        with pytest.raises(generate_cmd.CliError, match="--mesh expects three positive integers"):
            generate_cmd.parse_mesh(bad)


# ----------------------------------------------------------------------------------- help / errors
def test_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name in COMMANDS:
        assert name in out
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0
    for flag in ("--target", "--draft", "--prompt", "--prompts-file", "--max-new-tokens", "--temperature",
                 "--top-k", "--top-p", "--seed", "--dtype", "--mesh", "--json", "--batch-size"):
        assert flag in out


def test_every_registered_command_resolves():
    for name in COMMANDS:
        assert callable(resolve(name)), name


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "hi", "--draft", "{model}"], "--draft needs --target"),
    (["--target", "/nonexistent/model/dir"], "--target directory not found: '/nonexistent/model/dir'"),
    (["--target", "{model}", "--prompt", ""], "prompt 0 is empty"),
    (["--target", "{model}", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--target", "{model}", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--target", "{model}", "--prompt", "hi", "--mesh", "1,2"], "--mesh expects three positive integers"),
    (["--target", "{model}", "--prompt", "hi", "--mesh", "1,1,3"], "--mesh 1,1,3: mesh data=1 x fsdp=1 x model=3"),
    (["--target", "{model}"], "no prompts: give --prompt TEXT"),
    (["--target", "{model}", "--prompt", "hi", "--draft", "/nonexistent/draft"], "--draft directory not found"),
    (["--target", "{model}", "--prompt", "hi", "--max-new-tokens", "1000"],
     "prompt length 2 + max_new_tokens 1000 = 1002 exceeds max_position_embeddings 256"),
])
def test_bad_input_exits_2_with_a_clear_message(tiny_qwen3_dir, extra, message, capsys):
    argv = ["generate"] + [a.replace("{model}", str(tiny_qwen3_dir)) for a in extra]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.strip().splitlines()[-1].startswith(f"dspark generate: error: {message}")
    assert "Traceback" not in err


def test_argparse_usage_errors_exit_2(capsys):
    code, _, err = run_cli(["no-such-command"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli(["generate", "--target", "x", "--max-new-tokens", "0"], capsys)
    assert code == 2 and "expected a positive integer" in err
    code, _, err = run_cli(["generate", "--dtype", "int8"], capsys)
    assert code == 2 and "invalid choice" in err


def test_console_script_help_is_lazy():
    """The installed `dspark` script (or `python -m dspark_cli.main`) prints help without
    importing any subcommand module (nor flax / torch)."""
    script = Path(sys.executable).parent / "dspark"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dspark_cli.main"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "usage: dspark" in proc.stdout
    heavy = sorted({c.target.partition(":")[0] for c in COMMANDS.values()} | {"flax", "torch", "infer.api"})
    probe = ("import sys; from dspark_cli.main import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []", proc.stdout + proc.stderr


def test_default_generate_runs_the_bundled_pair(capsys):
    """`dspark generate` with no model arguments: bundled target + DSpark drafter, side by side."""
    from infer.demo import bundled_paths

    bundled_paths()  # the pair must be committed in models/
    code, out, err = run_cli(["generate", "--max-new-tokens", "24", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    m = doc["metrics"]
    assert m["greedy_outputs_equal"] is True
    assert len(doc["results"]) == 1 and len(doc["results"][0]["token_ids"]) > 0
    assert m["acceptance_length"] >= 1.0 and m["speedup"] > 0
    for key in ("autoregressive_tokens_per_s", "speculative_tokens_per_s", "accept_rate", "verify_rate"):
        assert key in m
    code, out, err = run_cli(["generate", "--max-new-tokens", "16"], capsys)
    assert code == 0, err
    assert "speed-up" in out and "acceptance length tau" in out
