"""transformers' Trainer and TRL's SFTTrainer on a model with lorakit adapters.

With ``add_lora`` alone, ``Trainer.save_model`` and every checkpoint are PEFT adapter folders
(a few kB, not the whole model) that PEFT and lorakit load with the trained model's logits;
with the ``AdapterCheckpoints`` mixin, ``resume_from_checkpoint`` continues exactly and
``load_best_model_at_end`` loads the best checkpoint's adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, add_lora, load_adapter
from lorakit.hf.trainer import AdapterCheckpoints

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama (vocab 64) saved as a folder: the base every run loads."""
    folder = tmp_path_factory.mktemp("base")
    tiny.llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rows():
    """16 rows of 12 tokens, the labels the inputs: no padding, the default collator."""
    from datasets import Dataset

    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(5)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _model(base: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    return model


def _trainer(base, rows, output, trainer_class=None, **changes):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        output_dir=str(output),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,
    )
    args = TrainingArguments(**{**settings, **changes})
    cls = trainer_class or type("LoraTrainer", (AdapterCheckpoints, Trainer), {})
    return cls(
        model=_model(base), args=args, train_dataset=rows, eval_dataset=rows.select(range(4))
    )


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _loads_alike(folder: Path, base: Path, expected: torch.Tensor | None = None) -> torch.Tensor:
    """Load ``folder`` with PEFT and with lorakit onto the base: equal logits (1e-5); those
    logits, which differ from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = tiny.logits(AutoModelForCausalLM.from_pretrained(base).eval())
    peft = tiny.logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    )
    ours = tiny.logits(load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), folder))
    assert tiny.max_diff(peft, ours) < 1e-5, folder
    assert tiny.max_diff(ours, plain) > 1e-4, f"{folder}: the adapter changes nothing"
    if expected is not None:
        assert tiny.max_diff(ours, expected) < 1e-5, folder
    return ours


def test_trainer_writes_adapter_sized_checkpoints_every_loader_reads(base, rows, tmp_path):
    from transformers import Trainer

    trainer = _trainer(base, rows, tmp_path / "run", Trainer, save_steps=1, save_total_limit=2)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"], "save_total_limit keeps the last 2"
    full_size = (base / "model.safetensors").stat().st_size
    for folder in [tmp_path / "run" / c for c in checkpoints] + [tmp_path / "final"]:
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, folder
        assert not names & {"model.safetensors", "config.json"}, folder
        assert (folder / "adapter_model.safetensors").stat().st_size < full_size / 4
        _loads_alike(folder, base)
    trained = tiny.logits(trainer.model.eval())
    _loads_alike(tmp_path / "final", base, trained)
    _loads_alike(tmp_path / "run" / "checkpoint-4", base, trained)


def test_resume_from_an_adapter_checkpoint_continues_exactly(base, rows, tmp_path):
    whole = _trainer(base, rows, tmp_path / "whole")
    whole.train()
    resumed = _trainer(base, rows, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    a, b = _adapter(whole.model), _adapter(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    start = load_file(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors")
    final = load_file(tmp_path / "whole" / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start), "steps 3-4 changed nothing"


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(base, rows, tmp_path):
    # The highest eval loss is "best" here, so that the best checkpoint is not the last one.
    trainer = _trainer(
        base,
        rows,
        tmp_path / "run",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-4", "the test needs a best checkpoint before the last"
    losses = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.name == f"checkpoint-{max(losses, key=losses.get)}"
    _loads_alike(best, base, tiny.logits(trainer.model.eval()))


def test_trl_sft_trainer_saves_loads_and_resumes_the_adapter(smollm2_tokenizer, tmp_path):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    rows = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"Order {i}?"},
                    {"role": "assistant", "content": f"pizza {i}"},
                ]
            }
            for i in range(16)
        ]
    )
    trainer_class = type("LoraSFTTrainer", (AdapterCheckpoints, SFTTrainer), {})

    def run(output: Path):
        args = SFTConfig(
            output_dir=str(output),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="steps",
            save_steps=2,
            max_length=32,
            seed=0,
            bf16=False,  # TRL's default autocast would make the trained logits bf16's
        )
        return trainer_class(
            model=_model(base), args=args, train_dataset=rows, processing_class=smollm2_tokenizer
        )

    whole = run(tmp_path / "run")
    whole.train()
    whole.save_model(tmp_path / "final")
    ids = torch.tensor([smollm2_tokenizer("pizza order 3")["input_ids"]])
    trained = tiny.logits(whole.model.eval(), ids)
    full_size = (base / "model.safetensors").stat().st_size
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == str(base), folder
        assert not (folder / "model.safetensors").exists(), folder
        assert (folder / "adapter_model.safetensors").stat().st_size < full_size / 4, folder
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        assert tiny.max_diff(tiny.logits(peft.eval(), ids), trained) < 1e-5, folder
        ours = load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), folder)
        assert tiny.max_diff(tiny.logits(ours, ids), trained) < 1e-5, folder
    plain = tiny.logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    assert tiny.max_diff(trained, plain) > 1e-4, "training changed nothing"
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    a, b = _adapter(whole.model), _adapter(resumed.model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
