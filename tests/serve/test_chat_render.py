"""Chat templates render sandboxed, with Hugging Face's whitespace settings."""

import pytest

from gptkit.serve.render import render_chat

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_block_tags_eat_their_newline_and_leading_spaces():
    # trim_blocks drops the newline after a block tag; lstrip_blocks the spaces before one.
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "U:{{ m['content'] }}\n"
        "    {% else %}\n"
        "A:{{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    assert render_chat(template, MESSAGES) == "U:hi\nA:yo\nA:"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reach object's subclasses
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append({'role': 'x'}) }}",  # immutable: no mutating the messages
    ],
)
def test_a_template_cannot_escape_the_sandbox(template):
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        render_chat(template, MESSAGES)
