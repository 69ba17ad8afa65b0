"""Exact-match references: the prompt is every turn before the last reply, and records that
have no reply to compare with are refused by number."""

import pytest

from lorakit import LoraError
from lorakit.generate import split_references


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_the_last_assistant_turn_is_the_reference():
    record = [_turn("system", "s"), _turn("user", "q"), _turn("assistant", "a")]
    prompts, references = split_references([record])
    assert prompts == [record[:2]] and references == ["a"]


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (["plain text"], "text records have no reference answer"),
        (
            [[_turn("user", "q"), _turn("assistant", "a")], [_turn("user", "q")]],
            "record 2 ends with a user turn. Add the expected reply to it, or remove it.",
        ),
    ],
)
def test_records_without_a_reply_are_refused(examples, message):
    with pytest.raises(LoraError, match=message):
        split_references(examples)


# --- a trained system prompt baked into a chat template (merged folders, GGUF) -----------------

HOSTILE = 'Reply in JSON: {"a": 1}.\nNo "%}", no {{ x }}, no \\ escapes; é 😀'


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_baked_system_prompt_replaces_smollm2s_default(smollm2_tokenizer):
    import copy

    from lorakit.generate import bake_system_prompt

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    user = [_turn("user", "two coffees")]
    assert "named SmolLM" in _render(tokenizer, user)  # the template's own default
    explicit = _render(tokenizer, [_turn("system", HOSTILE), *user])
    tokenizer.chat_template = bake_system_prompt(tokenizer.chat_template, HOSTILE)
    assert _render(tokenizer, user) == explicit  # exactly as if the system prompt were given
    assert "named SmolLM" not in _render(tokenizer, user)
    # A conversation's own system message wins, as with lorakit generate --system.
    mine = [_turn("system", "Be brief."), *user]
    assert _render(tokenizer, mine) == _render(smollm2_tokenizer, mine)


def test_no_system_prompt_leaves_the_template_alone():
    from lorakit.generate import GenerationSettings, bake_system_prompt

    assert bake_system_prompt("T", None) == bake_system_prompt("T", "") == "T"
    assert GenerationSettings(None, None).template_for(None) is None
    assert GenerationSettings("s", "mine").template_for("model's") == bake_system_prompt(
        "mine", "s"
    )
    assert GenerationSettings("s").template_for("model's") == bake_system_prompt("model's", "s")


def test_bake_into_a_processor_keeps_the_trained_template_for_the_settings_file():
    from types import SimpleNamespace

    from lorakit.generate import GenerationSettings, bake_system_prompt

    tokenizer = SimpleNamespace(chat_template="T")
    processor = SimpleNamespace(chat_template="T", tokenizer=tokenizer)
    kept = GenerationSettings("s").bake_into(processor)
    assert kept == GenerationSettings("s", "T")  # --system '' on the merged folder: none
    assert processor.chat_template == tokenizer.chat_template == bake_system_prompt("T", "s")
    named = SimpleNamespace(chat_template={"default": "T", "tool_use": "U"})
    GenerationSettings("s").bake_into(named)
    assert named.chat_template == {
        "default": bake_system_prompt("T", "s"),
        "tool_use": bake_system_prompt("U", "s"),
    }
