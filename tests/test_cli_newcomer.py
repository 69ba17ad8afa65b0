"""A newcomer's path through the CLI (issue 16): saved generation settings, fast help, checks
before any model loads, ``--resume DIR`` alone, and the messages a user reads.

Models here are tiny random Llamas with a character-level tokenizer (103 tokens), so a LoRA
learns a fixed answer shape in a couple of seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.generate import GENERATION_FILE, json_shape
from lorakit.training.metrics import METRICS_FILE, Metrics

SYSTEM = "Reply in JSON."
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """One token per printable character, plus <pad> (0), <|im_start|> (1) and <|im_end|> (2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def tiny_model_folder(folder: Path, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def orders(count: int, system: str | None = SYSTEM, start: int = 0) -> str:
    """JSONL chat records: an order, and its answer in one JSON shape ({"qty": int})."""
    rows = []
    for i in range(start, start + count):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": f"{i} pizzas"},
            {"role": "assistant", "content": json.dumps({"qty": i % 3}, separators=(",", ":"))},
        ]
        rows.append(json.dumps({"messages": messages}) + "\n")
    return "".join(rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CLI keeps an OMP_NUM_THREADS given)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("newcomer")
    paths = {
        "model": tiny_model_folder(root / "tiny"),
        "other": tiny_model_folder(root / "other", hidden=48),
        "train": root / "train.jsonl",
        "test": root / "test.jsonl",
    }
    paths["train"].write_text(orders(16))
    paths["test"].write_text(orders(3, start=100))
    return paths


def run_cli(*argv: str) -> tuple[int, str]:
    """``lorakit argv``: exit code and what went to stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> tuple[Path, str]:
    """A run whose data all carry SYSTEM, so the adapter answers in that shape only under it:
    the output folder and what ``lorakit train`` printed."""
    out = tmp_path_factory.mktemp("run")
    code, printed = run_cli(
        "train", "--model", files["model"], "--data", files["train"], "--test-data",
        files["test"], "--output", out, "--max-steps", "60", "--batch-size", "8",
        "--seq-len", "64", "--lr", "1e-2", "--warmup-steps", "0", "--schedule", "constant",
        "--rank", "8", "--alpha", "16", "--dropout", "0",
    )  # fmt: skip
    assert code == 0, printed
    return out, printed


# --- generation settings travel with the adapter -----------------------------------------------


def test_train_saves_the_shared_system_prompt_and_the_table_checks_generate(trained):
    out, printed = trained
    saved = json.loads((out / GENERATION_FILE).read_text())
    assert saved == {"system": SYSTEM, "chat_template": None}
    # Three test requests without their system prompt, prompted as `generate` does.
    assert "JSON shape, generate           -       3/3" in printed
    assert f"saved with it: the system prompt {SYSTEM!r}" in printed


def _spy_replies(monkeypatch) -> list[list[dict]]:
    import lorakit.generate

    seen = []
    real = lorakit.generate.stream_reply

    def spy(model, tokenizer, messages, max_new_tokens):
        seen.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, max_new_tokens)

    monkeypatch.setattr(lorakit.generate, "stream_reply", spy)
    return seen


def test_generate_without_system_answers_in_the_trained_shape(trained, monkeypatch):
    out, _ = trained
    seen = _spy_replies(monkeypatch)
    code, reply = run_cli("generate", "--adapter", out, "--max-new-tokens", "12", "7", "pizzas")
    assert code == 0
    assert seen[-1] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "7 pizzas"},
    ]
    assert json_shape(reply.strip()) == json_shape('{"qty":1}'), reply
    # --system '' turns the saved prompt off; --system replaces it.
    run_cli("generate", "--adapter", out, "--system", "", "--max-new-tokens", "2", "7 pizzas")
    assert seen[-1] == [{"role": "user", "content": "7 pizzas"}]
    run_cli("generate", "--adapter", out, "--system", "Be brief.", "--max-new-tokens", "2", "x")
    assert seen[-1][0] == {"role": "system", "content": "Be brief."}


def test_chat_and_eval_use_the_saved_system_prompt(trained, files, tmp_path, monkeypatch):
    import lorakit.generate

    out, _ = trained
    seen = _spy_replies(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("7 pizzas\n\n"))
    assert run_cli("chat", "--adapter", out, "--max-new-tokens", "2")[0] == 0
    assert seen[0][0] == {"role": "system", "content": SYSTEM}

    scored = []
    real = lorakit.generate.exact_match_score
    monkeypatch.setattr(
        lorakit.generate,
        "exact_match_score",
        lambda model, tok, examples, **kw: scored.append(examples) or real(model, tok, examples),
    )
    bare = tmp_path / "bare.jsonl"
    bare.write_text(orders(2, system=None))
    code, printed = run_cli("eval", "--adapter", out, "--data", bare)
    assert code == 0 and "exact match:" in printed
    assert [e[0] for e in scored[0]] == [{"role": "system", "content": SYSTEM}] * 2


def test_chat_says_how_to_quit_and_refuses_image_on_a_text_model(trained, monkeypatch):
    out, _ = trained
    seen = _spy_replies(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("/image cat.png\n7 pizzas\n/quit\nnot sent\n"))
    code, printed = run_cli("chat", "--adapter", out, "--max-new-tokens", "2")
    assert code == 0
    assert printed.startswith("(an empty line, /quit or Ctrl-D ends the chat)\n")
    assert "(not sent: /image needs a vision-language model, and " in printed
    assert [m[-1]["content"] for m in seen] == ["7 pizzas"]  # /image was not sent as text


def test_adapters_in_use_must_agree_on_their_system_prompt(trained, tmp_path, capsys, monkeypatch):
    import shutil

    out, _ = trained
    other, bare = tmp_path / "other", tmp_path / "bare"
    shutil.copytree(out, other)
    (other / GENERATION_FILE).write_text(json.dumps({"system": "Reply in words."}))
    shutil.copytree(out, bare)
    (bare / GENERATION_FILE).unlink()  # e.g. a PEFT adapter: no settings, no say
    argv = ["generate", "--adapter", f"a={out}", "--adapter", f"b={other}", "--use", "a,b"]
    assert main([*argv, "--max-new-tokens", "1", "hi"]) == 2
    assert (
        f"The adapters in use were trained with different system prompts ({out}, {other}); "
        "pass --system to choose one ('' for none)."
    ) in capsys.readouterr().err
    seen = _spy_replies(monkeypatch)
    assert main([*argv, "--system", "Be brief.", "--max-new-tokens", "1", "hi"]) == 0
    argv = ["generate", "--adapter", f"a={out}", "--adapter", f"b={bare}", "--use", "a,b"]
    assert main([*argv, "--max-new-tokens", "1", "hi"]) == 0
    assert [m[0]["content"] for m in seen] == ["Be brief.", SYSTEM]


def test_merged_folder_keeps_the_settings(trained, tmp_path, monkeypatch):
    out, _ = trained
    merged = tmp_path / "merged"
    assert run_cli("merge", "--adapter", out, "--output", merged)[0] == 0
    assert json.loads((merged / GENERATION_FILE).read_text())["system"] == SYSTEM
    seen = _spy_replies(monkeypatch)
    assert run_cli("generate", "--model", merged, "--max-new-tokens", "2", "7 pizzas")[0] == 0
    assert seen[0][0] == {"role": "system", "content": SYSTEM}


def test_plain_transformers_on_the_merged_folder_answers_like_the_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    merged = tmp_path / "merged"
    assert run_cli("merge", "--adapter", out, "--output", merged)[0] == 0
    code, expected = run_cli("generate", "--adapter", out, "--max-new-tokens", "12", "7 pizzas")
    assert code == 0 and json_shape(expected.strip()) == json_shape('{"qty":1}'), expected
    # Without lorakit, no system message: the template the folder carries supplies SYSTEM.
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    user = [{"role": "user", "content": "7 pizzas"}]
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n7 pizzas" + (
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    enc = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0)
    reply = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply == expected.strip()
    # The settings file keeps the template as trained: --system '' there still means none.
    saved = json.loads((merged / GENERATION_FILE).read_text())
    assert saved == {"system": SYSTEM, "chat_template": TEMPLATE}


def test_chat_template_file_is_saved_and_used(files, tmp_path, monkeypatch):
    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE.replace("<|im_start|>", "<|im_start|> "))
    out = tmp_path / "run"
    code, _ = run_cli(
        "train", "--model", files["model"], "--data", files["train"], "--output", out,
        "--max-steps", "1", "--batch-size", "2", "--seq-len", "64", "--warmup-steps", "0",
        "--chat-template", template,
    )  # fmt: skip
    assert code == 0
    assert json.loads((out / GENERATION_FILE).read_text())["chat_template"] == template.read_text()
    import lorakit.data.encode

    rendered = []
    real = lorakit.data.encode.render_prompt
    monkeypatch.setattr(
        lorakit.data.encode,
        "render_prompt",
        lambda tok, m: rendered.append(real(tok, m)) or rendered[-1],
    )
    assert run_cli("generate", "--adapter", out, "--max-new-tokens", "1", "hi")[0] == 0
    assert rendered[0].startswith("<|im_start|> system\n" + SYSTEM)


# --- what a command shows: its own lines, no one else's bars -----------------------------------


def test_generate_says_what_it_loads_before_it_loads(trained, files, capsys, monkeypatch):
    import lorakit.models.load

    out, _ = trained
    real, shown = lorakit.models.load.load_model, []

    def spy(*args, **kwargs):
        shown.append(capsys.readouterr().err)  # what the user had read when the load began
        return real(*args, **kwargs)

    monkeypatch.setattr(lorakit.models.load, "load_model", spy)
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "1", "7 pizzas"]) == 0
    assert shown == [f"loading {files['model'].resolve()} with the adapter {out}\n"]


def test_merge_shows_no_transformers_bars(trained, tmp_path, capsys):
    out, _ = trained
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert "it/s]" not in err  # nor any other tqdm bar of theirs


def test_a_training_log_in_a_file_holds_no_cursor_escapes(files, tmp_path, capsys):
    # The val-loss bar opens inside the train bar; in a file tqdm would move the cursor up
    # (ESC[A) at each of its redraws.
    code, printed = run_cli(
        "train", "--model", files["model"], "--data", files["train"], "--val-data",
        files["test"], "--output", tmp_path, "--max-steps", "2", "--eval-every", "1",
        "--batch-size", "2", "--seq-len", "64", "--warmup-steps", "0",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "step 1: eval loss" in printed
    assert "val loss:" in err and "train:" in err  # both bars were drawn ...
    assert "\x1b[" not in err and "\x1b[" not in printed  # ... without escapes


# --- fast start and cheap checks first ----------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_imports_no_transformers(argv):
    code = (
        "import sys\n"
        "from lorakit.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('transformers', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: lorakit" in done.stdout
    assert "HEAVY []" in done.stdout


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import lorakit.models.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input checks")

    monkeypatch.setattr(lorakit.models.load, "load_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "missing.jsonl"], "--data missing.jsonl: file not found"),
        (["train", "--data", "{bad}"], "bad.jsonl, line 1: not valid JSON"),
        (["train", "--data", "{train}", "--test-data", "{text}"], "Exact match needs chat"),
        (["train", "--data", "{train}", "--val-data", "nope.jsonl"], "--val-data nope.jsonl"),
        (["train", "--data", "{train}", "--chat-template", "t.jinja"], "--chat-template t.jinja"),
        (["train", "--data", "{train}", "--model", "{empty}"], "holds neither a model"),
        (["train", "--data", "{train}", "--nproc", "2", "--test-data", "x.jsonl"], "x.jsonl"),
        (["train", "--resume", "{empty}"], "No checkpoint found"),
        (["eval", "--data", "{bad}"], "not valid JSON"),
        (["eval", "--adapter", "{empty}", "--data", "{train}"], "not an adapter folder"),
        (["generate", "--model", "org/name", "hi"], "--model org/name: 'org/name' is not a local"),
        (
            ["generate", "--model", "/nonexistent/model", "hi"],
            "--model /nonexistent/model: not found (no such file or folder). Pass smollm2-135m "
            "(the bundled model), a .gguf file, a Hugging Face model folder",
        ),
        (["generate", "--adapter", "{fake}", "--chat-template", "t.jinja", "hi"], "t.jinja"),
        (["factorize", "--model", "{model}", "--rank", "2", "--output", "{model}"], "not empty"),
        (["factorize", "--model", "{model}", "--energy", "1.5", "--output", "o"], "(0, 1]"),
        (["inspect", "{fake}", "--plot", "spectra.jpg"], "give a .png file"),
        (["resize", "{empty}", "--rank", "2", "--output", "o"], "adapter {empty}: not an"),
        (["combine", "--adapter", "a={fake}", "--method", "svd", "--output", "o"], "needs --rank"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(
    argv, message, files, tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.chdir(tmp_path)
    names = {"bad": tmp_path / "bad.jsonl", "text": tmp_path / "text.jsonl"}
    names["bad"].write_text("{not json\n")
    names["text"].write_text('{"text": "just text"}\n')
    names["empty"] = tmp_path / "empty"
    names["empty"].mkdir()
    names["fake"] = tmp_path / "fake"
    names["fake"].mkdir()
    base = {"base_model_name_or_path": str(files["model"])}
    (names["fake"] / "adapter_config.json").write_text(json.dumps(base))
    names.update(model=files["model"], train=files["train"])
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err
    assert "Traceback" not in err


# --- --resume DIR alone ------------------------------------------------------------------------

RUN = ("--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--seq-len", "64")
RUN += ("--lr", "1e-2", "--warmup-steps", "1", "--rank", "4", "--dropout", "0.1")


def _losses(output: Path) -> dict[int, float]:
    lines = (output / METRICS_FILE).read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_resume_dir_alone_continues_a_killed_run_exactly(files, tmp_path, monkeypatch):
    import lorakit.training.loop

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("train", "--model", files["model"], "--data", files["train"], *RUN)
    assert run_cli(*common, "--output", whole)[0] == 0

    real = lorakit.training.loop.save_checkpoint

    def save_then_die(output, step, *args, **kwargs):
        folder = real(output, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # killed right after its first checkpoint
        return folder

    monkeypatch.setattr(lorakit.training.loop, "save_checkpoint", save_then_die)
    assert run_cli(*common, "--output", killed)[0] == 130  # what the CLI makes of Ctrl-C
    monkeypatch.setattr(lorakit.training.loop, "save_checkpoint", real)
    assert sorted(_losses(killed)) == [1, 2]

    code, printed = run_cli("train", "--resume", killed)  # no config file, no other flag
    assert code == 0, printed
    assert f"resumed from {killed / 'checkpoints' / 'step-2'} at step 2" in printed
    assert _losses(killed) == pytest.approx(_losses(whole), abs=1e-6)
    assert sorted(_losses(killed)) == [1, 2, 3, 4]
    from safetensors.torch import load_file

    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(killed / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_resume_refuses_conflicting_flags_by_name(files, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("train", "--model", files["model"], "--data", files["train"], *RUN)
    assert run_cli(*common, "--output", out, "--max-steps", "2")[0] == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "0.5", "--targets", "q_proj"]) == 2
    err = capsys.readouterr().err
    conflicts = "--targets q_proj (the run has all-linear), --lr 0.5 (the run has 0.01)"
    assert f"Cannot resume {out} with {conflicts}: a resumed run keeps the settings" in err
    # Settings a resume may change are accepted.
    assert run_cli("train", "--resume", out, "--keep-checkpoints", "3")[0] == 0


# --- messages ------------------------------------------------------------------------------------


def test_a_missing_model_is_named_once(capsys, no_model_load):
    assert main(["generate", "--model", "/nonexistent/model", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("/nonexistent/model") == 1 and "Pass smollm2-135m" in err, err


def test_adapter_for_another_base_names_it_in_a_few_lines(trained, files, capsys):
    out, _ = trained
    argv = ["generate", "--model", str(files["other"]), "--adapter", str(out), "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    model, other = files["model"].resolve(), files["other"].resolve()
    # Before loading: the CLI says the adapter records another base.
    assert f"note: adapter {out} records base model {model}; loading it onto {other}" in err
    error = err[err.index("lorakit generate: error: ") :]
    assert len(error.strip().splitlines()) <= 5, error  # not one line per weight
    assert f"made for: {model}; this model: {other}" in error
    assert "14 of 14 adapted weights differ" in error
    assert "Traceback" not in err


def test_task_runs_print_true_rows_and_log_each_task_loss(files, tmp_path):
    tasks = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    tasks["a"].write_text(orders(6))
    tasks["b"].write_text(orders(4, system="Reply in words."))
    out = tmp_path / "run"
    code, printed = run_cli(
        "train", "--model", files["model"], "--task", f"a={tasks['a']}", "--task",
        f"b={tasks['b']}", "--output", out, "--max-steps", "2", "--batch-size", "2",
        "--seq-len", "64", "--warmup-steps", "0",
    )  # fmt: skip
    assert code == 0
    assert "1 process(es) x batch 2 x grad-accum 1 x 2 tasks = 4 rows per step (2 per task)" in (
        printed
    )
    assert "sequences per step" not in printed
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    for record in records:
        assert set(record["task_loss"]) == {"a", "b"}
        assert record["loss"] == pytest.approx(sum(record["task_loss"].values()), rel=1e-6)
    assert records[0]["task_loss"]["a"] != records[0]["task_loss"]["b"]
    # Each task keeps its own system prompt.
    assert json.loads((out / "b" / GENERATION_FILE).read_text())["system"] == "Reply in words."
    figure = Metrics(out, start_step=2, tensorboard=False, is_main=True).figure()
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == ["train (sum of tasks)", "train a", "train b"]


def test_warmup_longer_than_the_run_warns(files, tmp_path):
    code, printed = run_cli(
        "train", "--model", files["model"], "--data", files["train"], "--output", tmp_path,
        "--max-steps", "2", "--warmup-steps", "5", "--batch-size", "2", "--seq-len", "64",
    )  # fmt: skip
    assert code == 0
    assert (
        "warning: --warmup-steps 5 is not shorter than the run (2 steps): the lr never reaches "
        "--lr 0.0002 and no cosine decay follows. Lower --warmup-steps (e.g. to 0)."
    ) in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--learning-rate", "1e-3"], "unknown flag --learning-rate (did you mean --lr?)"),
        (["train", "--lora-alpha=8"], "unknown flag --lora-alpha (did you mean --alpha?)"),
        (
            ["train", "--warmpu-steps", "2"],
            "unknown flag --warmpu-steps (did you mean --warmup-steps?)",
        ),
        (["generate", "--max-tokens", "5", "hi"], "(did you mean --max-new-tokens?)"),
        (["trian"], "unknown command 'trian' (did you mean train?)"),
        (["--debug", "trian"], "unknown command 'trian' (did you mean train?)"),
        # A typo in a required flag: named, not "the following arguments are required".
        (["eval", "--daata", "x.jsonl"], "unknown flag --daata (did you mean --data?)"),
        (
            ["merge", "--adapter", "a", "--ouput", "o"],
            "unknown flag --ouput (did you mean --output?)",
        ),
        (["export", "runs/x", "--to=gguf", "--outptu=o"], "unknown flag --outptu (did you mean"),
        # No prefix matching: --dat is not --data, --max-new is not --max-new-tokens.
        (["eval", "--dat", "x.jsonl"], "unknown flag --dat (did you mean --data?)"),
        (["generate", "--max-new", "5", "hi"], "unknown flag --max-new (did you mean"),
        (["train", "--rank", "4", "--lr", "1", "--alph", "8"], "unknown flag --alph (did you mean"),
    ],
)
def test_unknown_flags_get_did_you_mean(argv, message, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "arguments are required" not in err


def test_no_parser_takes_a_prefix_for_a_flag():
    from lorakit.cli import build_parser

    parser = build_parser()
    (subparsers,) = parser._subparsers._group_actions
    assert parser.allow_abbrev is False
    assert {n for n, p in subparsers.choices.items() if p.allow_abbrev} == set()


def test_a_value_that_looks_like_a_flag_is_a_value(capsys, no_model_load):
    # argparse takes "--- terse" (a space in it) and what follows "--" as values: so does
    # the check for mistyped flags.
    argv = ["generate", "--system", "--- terse", "--adapter", "/nonexistent/run", "--", "--hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--adapter /nonexistent/run: not an adapter folder" in err
    assert "unknown flag" not in err


def test_unknown_yaml_key_gets_did_you_mean(tmp_path, capsys, no_model_load):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.001\nrnak: 4\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        f"Unknown config keys in {config}: learning_rate (did you mean lr?), "
        "rnak (did you mean rank?)"
    ) in err


def test_loss_plot_has_integer_steps_and_plain_loss_labels(tmp_path):
    metrics = Metrics(tmp_path, 0, tensorboard=False, is_main=True)
    for step, loss in enumerate([4.03, 4.025, 4.02, 4.01], start=1):
        metrics.train(step, loss, 1e-3, 1.0, 100.0)
    figure = metrics.figure()
    figure.canvas.draw()
    ax = figure.axes[0]

    low, high = ax.get_xlim()
    x = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert x and all(text.isdigit() for text in x)  # 1, 2, 3, 4: no 1.5 or 2.5
    low, high = ax.get_ylim()
    y = [
        t.get_text()
        for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
        if t.get_text() and low <= t.get_position()[1] <= high
    ]
    # Plain numbers, each parseable as written (not "$\\mathdefault{4.025\\times10^{0}}$").
    assert "4.02" in y and all(4.0 <= float(text) <= 4.04 for text in y)
