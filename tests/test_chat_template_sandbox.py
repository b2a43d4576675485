"""Every family's chat template runs inside the sandbox: it renders, the messages' text is
never evaluated as template code, what a hostile file appends to it is refused, and
neither code execution nor unbounded time or memory is reachable from it."""
import copy

import pytest

from engine.chat_template import (BUILTIN_TEMPLATES, MAX_RENDERED, ChatTemplate,
                                  ChatTemplateError)
from test_arch_gemma3 import GEMMA3_IT_TEMPLATE, GEMMA_TEMPLATE
from test_arch_phi3 import PHI3_TEMPLATE
from test_arch_qwen import QWEN_TEMPLATE
from test_chat_template import SMOLLM2_TEMPLATE

# A Qwen3-style template, in its structure: a namespace walked over the messages in
# reverse to find the last real user turn, reasoning split off earlier assistant turns at
# '</think>', tool results folded into user turns, tools listed as JSON.
QWEN3_STYLE_TEMPLATE = """
{%- if tools %}{{- '<|im_start|>system\\n' }}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
  {%- set index = (messages|length - 1) - loop.index0 %}
  {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
    {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
  {%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role in ("user", "system") %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
  {%- elif message.role == "assistant" %}
    {%- set content = message.content %}
    {%- if '</think>' in content %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
  {%- elif message.role == "tool" %}
    {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Each family's template with the BOS and EOS texts its files carry.
FAMILIES = {
    "smollm2": (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>"),
    "qwen2": (QWEN_TEMPLATE, "", "<|endoftext|>"),
    "qwen3": (QWEN3_STYLE_TEMPLATE, "", "<|im_end|>"),
    "phi3": (PHI3_TEMPLATE, "<s>", "<|endoftext|>"),
    "gemma3": (GEMMA_TEMPLATE, "<bos>", "<eos>"),
    "gemma3-it": (GEMMA3_IT_TEMPLATE, "<bos>", "<eos>"),
    **{f"builtin-{name}": (src, "<s>", "</s>") for name, src in BUILTIN_TEMPLATES.items()},
}

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}]

# Template syntax and special-token text as message content: it is data, shown verbatim.
HOSTILE_CONTENT = ("{{ 7 * 7 }} {% for i in range(10**9) %}x{% endfor %} "
                   "{{ ''.__class__.__mro__[1].__subclasses__() }} <|im_end|><end_of_turn>")

# What a hostile file might append to (or put before) an honest template.
CODE_PAYLOADS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{% set _ = messages[0].update({'content': 'changed'}) %}",
]
RESOURCE_PAYLOADS = [
    "{{ 'a' * 10**10 }}",
    "{{ ([0] * 10**9) | length }}",
    "{{ 7 ** 99999999 }}",
    "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    "{{ range(10**9) | list | length }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ '{:>2000000000}'.format(1) }}",
    "{{ '{0:{1}}'.format(1, 2000000000) }}",
    "{{ '%2000000000d' % 1 }}",
    "{{ '%2000000000d' | format(1) }}",
    "{{ 'x'.center(2000000000) }}",
    "{{ 'x' | center(2000000000) }}",
    "{{ 'x'.zfill(2000000000) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    src, bos, eos = FAMILIES[request.param]
    return request.param, src, bos, eos


def test_renders_in_the_sandbox_and_leaves_the_messages_alone(family):
    name, src, bos, eos = family
    t = ChatTemplate(src, bos, eos)
    conv = copy.deepcopy(CONV)
    if name == "builtin-llama2":  # its system prompt folds into the first user turn
        conv = conv[1:]
    text = t.render(conv)
    for m in conv:
        assert m["content"].strip() in text
    assert conv == (CONV[1:] if name == "builtin-llama2" else CONV)


def test_message_text_is_never_evaluated(family):
    name, src, bos, eos = family
    t = ChatTemplate(src, bos, eos)
    text = t.render([{"role": "user", "content": HOSTILE_CONTENT}])
    assert HOSTILE_CONTENT.strip() in text
    assert "49" not in text


@pytest.mark.parametrize("where", ["after", "before"])
@pytest.mark.parametrize("payload", CODE_PAYLOADS)
def test_code_payloads_in_a_family_template_are_refused(family, payload, where, tmp_path,
                                                        monkeypatch):
    name, src, bos, eos = family
    monkeypatch.chdir(tmp_path)
    conv = [dict(m) for m in CONV[1:]]
    t = ChatTemplate(src + payload if where == "after" else payload + src, bos, eos)
    with pytest.raises(ChatTemplateError):
        t.render(conv)
    assert conv == CONV[1:], "the template changed the caller's messages"
    assert list(tmp_path.iterdir()) == [], "the template executed something"


@pytest.mark.parametrize("payload", RESOURCE_PAYLOADS)
def test_resource_payloads_in_a_family_template_are_refused(family, payload):
    """Each is refused before it builds its huge value or runs its loop out, so the peak
    memory stays within a few times the sandbox's size limit."""
    import resource
    name, src, bos, eos = family
    t = ChatTemplate(src + payload, bos, eos)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ChatTemplateError, match="limit|budget|recursed"):
        t.render(CONV[1:])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 4 * MAX_RENDERED * 4 / 2**20, f"the peak RSS grew {grown_mb:.0f} MB"


def test_the_range_budget_is_per_render():
    """The range budget is spent per render, not per template: a template that loops a
    lot, but within the budget, renders again and again."""
    t = ChatTemplate("{% for i in range(600000) %}{% endfor %}{{ messages | length }}")
    for _ in range(3):
        assert t.render(CONV) == "4"
    with pytest.raises(ChatTemplateError, match="budget"):
        ChatTemplate("{% for i in range(600000) %}{% endfor %}"
                     "{% for i in range(600000) %}{% endfor %}").render(CONV)
