from gpt2.template import format_chat, format_prompt


def test_prompt_without_and_with_input():
    p = format_prompt("Name a color.")
    assert p.endswith("### Instruction:\nName a color.\n\n### Response:\n") and "### Input" not in p
    q = format_prompt("Translate.", "bonjour")
    assert "### Input:\nbonjour\n\n### Response:\n" in q and "paired with an input" in q


def test_chat_single_turn_equals_prompt():
    assert format_chat([{"role": "user", "content": "Hi?"}]) == format_prompt("Hi?")


def test_chat_history_goes_to_input():
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C"}]
    assert format_chat(msgs) == format_prompt("C", "User: A\nAssistant: B")
