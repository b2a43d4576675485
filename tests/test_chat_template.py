"""Chat templates: rendering, built-in fallbacks, the sandbox."""
import pytest

from engine.chat_template import (BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError,
                                  detect_template)
from engine.errors import KilnError

# SmolLM2-135M-Instruct's tokenizer.chat_template, as stored in its GGUF.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}]


class FakeTokenizer:
    """Just what ChatTemplate.for_model reads: special token texts and the vocabulary."""

    def __init__(self, vocab, bos_id=None, eos_id=None):
        self.vocab, self.bos_id, self.eos_id = vocab, bos_id, eos_id
        self.n_vocab = len(vocab)

    def token_text(self, i):
        return self.vocab[i]


def test_smollm2_template_renders_like_transformers():
    t = ChatTemplate(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(CONV, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert t.name == "chatml" and t.end_of_turn == ["<|im_end|>"]


def test_builtins():
    chatml = ChatTemplate.builtin("chatml")
    assert chatml.render(CONV[:2]) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                       "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    llama2 = ChatTemplate.builtin("llama2", "<s>", "</s>")
    assert llama2.render(CONV) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                                   "<s>[INST] 2+2? [/INST]")
    assert llama2.end_of_turn == ["</s>"]
    llama3 = ChatTemplate.builtin("llama3", "<|begin_of_text|>", "<|end_of_text|>")
    assert llama3.render(CONV[1:2]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.end_of_turn == ["<|eot_id|>"]
    # llama.cpp's gemma format: the system message opens the first user turn
    gemma = ChatTemplate.builtin("gemma", "<bos>", "<eos>")
    assert gemma.render(CONV) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
        "<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert gemma.render(CONV[1:2], add_generation_prompt=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n")
    assert gemma.end_of_turn[0] == "<end_of_turn>"
    with pytest.raises(ChatTemplateError, match="alternate"):
        llama2.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="unknown built-in"):
        ChatTemplate.builtin("vicuna")


def test_detect_template_like_llama_cpp():
    assert detect_template(SMOLLM2_TEMPLATE) == "chatml"
    assert detect_template(BUILTIN_TEMPLATES["llama3"]) == "llama3"
    assert detect_template(BUILTIN_TEMPLATES["llama2"]) == "llama2"
    assert detect_template(BUILTIN_TEMPLATES["gemma"]) == "gemma"
    assert detect_template("{{ messages }}") is None


def test_for_model_prefers_file_template_then_vocab_family():
    vocab = ["<unk>", "<s>", "</s>", "a", "b"]
    tok = FakeTokenizer(vocab, bos_id=1, eos_id=2)
    t = ChatTemplate.for_model({"tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}"}, tok)
    assert t.render([{"role": "user", "content": "x"}]) == "<s>x"
    # No template, SentencePiece vocabulary: Llama-2-chat.
    assert ChatTemplate.for_model({"tokenizer.ggml.model": "llama"}, tok).name == "llama2"
    # No template, byte-level BPE without markers: ChatML (llama.cpp's default).
    assert ChatTemplate.for_model({"tokenizer.ggml.model": "gpt2"}, tok).name == "chatml"
    l3 = FakeTokenizer(vocab + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], 1, 2)
    assert ChatTemplate.for_model({"tokenizer.ggml.model": "gpt2"}, l3).name == "llama3"
    # a SentencePiece vocabulary with Gemma's turn markers: Gemma, not Llama-2-chat
    gemma = FakeTokenizer(vocab + ["<start_of_turn>", "<end_of_turn>"], 1, 2)
    assert ChatTemplate.for_model({"tokenizer.ggml.model": "llama"}, gemma).name == "gemma"


def test_override_from_file_or_name(tmp_path):
    tok = FakeTokenizer(["<s>", "</s>"], bos_id=0, eos_id=1)
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    t = ChatTemplate.for_model({"tokenizer.chat_template": SMOLLM2_TEMPLATE}, tok, override=f)
    assert t.render(CONV[1:2]) == "[user] Hi\n"
    assert ChatTemplate.for_model({}, tok, override="llama3").name == "llama3"
    with pytest.raises(ChatTemplateError, match="not found"):
        ChatTemplate.for_model({}, tok, override=tmp_path / "missing.jinja")


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ self.__init__.__globals__.__builtins__.open('PWNED', 'w') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages[0]['content'].format.__globals__ }}",
    "{% set l = [] %}{{ l.append(1) }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch PWNED') }}",
])
def test_code_execution_payload_is_refused(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = ChatTemplate(payload)
    with pytest.raises(ChatTemplateError) as e:
        t.render([{"role": "user", "content": "hi"}])
    assert isinstance(e.value, KilnError)
    assert "unsafe" in str(e.value) or "undefined" in str(e.value)
    assert list(tmp_path.iterdir()) == []      # nothing was executed


def test_bad_templates_and_messages():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  ")
    t = ChatTemplate.builtin("chatml")
    with pytest.raises(ChatTemplateError, match="list"):
        t.render("hello")
    with pytest.raises(ChatTemplateError, match="role"):
        t.render([{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="rejected"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])


def test_template_helpers():
    t = ChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
                     "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}")
    out = t.render([{"role": "user", "content": "é"}, {"role": "user", "content": "z"}], False)
    assert out == '[{"role": "user", "content": "é"}, {"role": "user", "content": "z"}]|4|z'


@pytest.mark.parametrize("vocab, family", [("llama", "llama2"), ("gpt2", "chatml")])
def test_fallback_with_a_real_tokenizer_adds_bos_once(vocab, family):
    """A file without a template: the built-in family is chosen from its vocabulary, and the
    rendered prompt's special-token text becomes single special tokens, BOS never twice."""
    import tiny_models
    from engine.chat import tokenize_prompt
    from engine.tokenizer import load_tokenizer

    md = tiny_models.llama_vocab() if vocab == "llama" else tiny_models.gpt2_vocab()
    del md["tokenizer.chat_template"]
    tok = load_tokenizer(md)
    t = ChatTemplate.for_model(md, tok)
    assert t.name == family

    class Tokenizing:          # the one LLM method tokenize_prompt uses
        def tokenize(self, text, add_bos=None, special=False, plain_spans=()):
            return tok.encode(text, add_bos=add_bos, special=special, plain_spans=plain_spans)

    text = t.render(CONV)
    ids = tokenize_prompt(Tokenizing(), t, text)
    if family == "llama2":
        assert text.startswith("<s>[INST]")
        assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
        assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1   # two [INST] turns
    else:
        im_start = tok.encode("<|im_start|>", add_bos=False, special=True)
        assert len(im_start) == 1 and ids.count(im_start[0]) == 5
    assert tok.decode(ids).replace(" ", "").startswith("[INST]" if family == "llama2" else "system")
