"Byte-level BPE from scratch: round trips, chunk boundaries, special tokens, files, errors, and equality with HF tokenizers."
import json

import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

from fttk.core import ConfigError, CorruptFileError
from fttk.tokenization import (BPEConfig, BPETokenizer, GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, byte_merges, count_chunks,
                               docs_corpus, hf_merges, pre_split, tie_rank, to_hf, toy_bpe, train_hf, train_incremental,
                               train_naive)

SPECIALS = ['<|endoftext|>', '<|user|>']
_HF = {}


def _hf(tok):
    "HF twin of `tok`, built once per tokenizer."
    if id(tok) not in _HF: _HF[id(tok)] = to_hf(tok)
    return _HF[id(tok)]


@pytest.fixture(scope='module')
def corpus():
    return docs_corpus(2**15)


@pytest.fixture(scope='module')
def tok(corpus):
    # a few non-English lines so merges inside multi-byte characters exist too
    extra = ["Grüße aus Köln, schöne Grüße! " * 5, "Καλημέρα κόσμε, καλημέρα! " * 5, "नमस्ते दुनिया नमस्ते " * 5, "🙂🙂 👍🏽👍🏽 " * 5]
    return BPETokenizer.train(corpus + extra, vocab_size=800, special_tokens=SPECIALS)


# ---- the lessons ----------------------------------------------------------------------------------------

def test_sennrich_toy_vocabulary():
    merges, seg = toy_bpe({'low': 5, 'lower': 2, 'newest': 6, 'widest': 3}, 4)
    assert merges == [('e', 's'), ('es', 't'), ('est', '</w>'), ('l', 'o')]
    assert seg == {'lo w </w>': 5, 'lo w e r </w>': 2, 'n e w est</w>': 6, 'w i d est</w>': 3}


def test_wikipedia_example():
    tk = BPETokenizer.train("aaabdaaabac", vocab_size=259, pattern='none')
    assert tk.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tk.decode([258]) == 'aaab'


def test_tie_rank_is_hf_id_order():
    from tokenizers import pre_tokenizers
    from fttk.tokenization import BYTE_TO_CHAR
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())          # HF numbers its alphabet in code point order
    assert [tie_rank(b) for b in range(256)] == [alphabet.index(BYTE_TO_CHAR[b]) for b in range(256)]


# ---- trainers ------------------------------------------------------------------------------------------

def test_naive_equals_incremental(corpus):
    counts = count_chunks(corpus[:30])
    assert train_incremental(counts, 700) == train_naive(counts, 700)


@pytest.mark.parametrize('pattern', ['gpt4', 'gpt2', 'none'])
def test_merges_equal_hf_trainer(corpus, pattern):
    docs = corpus[:25] if pattern != 'none' else [l for d in corpus[:3] for l in d.splitlines() if l.strip()]
    ours = BPETokenizer.train(docs, vocab_size=900, pattern=pattern)
    theirs = train_hf(docs, 900, pattern)
    assert byte_merges(ours) == hf_merges(theirs)
    assert ours.vocab_size == theirs.get_vocab_size()


def test_merges_equal_hf_trainer_with_specials(corpus):
    ours = BPETokenizer.train(corpus[:20], vocab_size=700, special_tokens=SPECIALS)
    theirs = train_hf(corpus[:20], 700, special_tokens=SPECIALS)
    assert byte_merges(ours) == hf_merges(theirs)
    assert ours.vocab_size == theirs.get_vocab_size() == 700


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(alphabet='abc d', min_size=1, max_size=12), min_size=1, max_size=8), st.integers(257, 300))
def test_merges_equal_hf_trainer_random_corpora(docs, vocab_size):
    "Small random corpora are full of ties: the tie rule must be HF's exactly."
    assert byte_merges(BPETokenizer.train(docs, vocab_size=vocab_size, pattern='gpt2')) == hf_merges(train_hf(docs, vocab_size, 'gpt2'))


# ---- encode / decode -----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, allowed_special='none')) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.characters(codec='utf-8') | st.sampled_from(['🙂', '👍🏽', 'e\u0301', '\u200d', '\r\n', '\ufeff', ' '])).map(''.join))
def test_roundtrip_emoji_and_combining(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=10), st.characters(categories=['Cs']), st.text(max_size=10))
def test_lone_surrogates_are_refused(tok, a, sur, b):
    with pytest.raises(ValueError, match=f"lone surrogate U\\+{ord(sur):04X} at position {len(a)}"):
        tok.encode(a + sur + b)


def test_decode_cut_character_gives_replacement(tok):
    ids = tok.encode('🙂')
    raw = tok.decode_bytes(ids)
    assert raw == '🙂'.encode()
    assert tok.decode(list(raw[:2])) == '\ufffd'        # one U+FFFD per maximal invalid subpart, as HF does
    assert tok.decode(list(b'a\xffb')) == 'a\ufffdb'


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_encode_equals_hf_arbitrary_text(tok, s):
    assert tok.encode(s) == _hf(tok).encode(s, add_special_tokens=False).ids


def test_encode_equals_hf_on_corpus_lines(tok, corpus):
    hf = _hf(tok)
    lines = [l for d in corpus for l in d.splitlines(keepends=True)]
    assert [tok.encode(l) for l in lines] == [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 799), max_size=20))
def test_decode_equals_hf(tok, ids):
    assert tok.decode(ids) == _hf(tok).decode(ids, skip_special_tokens=False)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_no_token_spans_two_chunks(tok, s):
    ids = tok.encode_ordinary(s)
    token_ends, pos = set(), 0
    for i in ids:
        pos += len(tok.vocab[i]); token_ends.add(pos)
    chunk_ends, pos = set(), 0
    for ch in pre_split(s, tok.pattern):
        pos += len(ch.encode()); chunk_ends.add(pos)
    assert chunk_ends <= token_ends        # every chunk boundary is a token boundary


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIALS)), max_size=8))
def test_special_tokens_never_split(tok, parts):
    s = ''.join(parts)
    ids = tok.encode(s)
    for sp in SPECIALS:
        assert ids.count(tok.special_tokens[sp]) == s.count(sp)
    assert tok.decode(ids) == s
    assert all(i < len(tok.vocab) for i in tok.encode(s, allowed_special='none'))   # 'none': specials are plain text


def test_special_ids_come_after_merges(tok):
    assert list(tok.special_tokens.values()) == [len(tok.vocab), len(tok.vocab) + 1]
    assert tok.vocab_size == 800


# ---- files ---------------------------------------------------------------------------------------------

def test_save_load_roundtrip(tok, tmp_path):
    p = tok.save(tmp_path/'tok.json')
    back = BPETokenizer.load(p)
    assert back.merges == tok.merges and back.pattern == tok.pattern and back.special_tokens == tok.special_tokens
    s = "Grüße <|endoftext|> def f(x): return x**2  🙂"
    assert back.encode(s) == tok.encode(s)


@pytest.mark.parametrize('damage, msg', [
    (lambda t: t[:len(t) // 2], 'cannot read tokenizer from'),
    (lambda t: '[1, 2, 3]', 'not an fttk-bpe file'),
    (lambda t: json.dumps({**json.loads(t), 'version': 7}), 'unknown version 7'),
    (lambda t: json.dumps({**json.loads(t), 'merges': [[0, 1], [5000, 2]]}), 'merge 1 (5000, 2) uses an id that does not exist yet'),
    (lambda t: json.dumps({**json.loads(t), 'merges': [[0, 'x']]}), 'merges must be a list of [id, id] pairs'),
])
def test_corrupt_file(tok, tmp_path, damage, msg):
    p = tok.save(tmp_path/'tok.json')
    p.write_text(damage(p.read_text()))
    with pytest.raises(CorruptFileError, match='cannot read tokenizer from') as e:
        BPETokenizer.load(p)
    assert msg in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='no tokenizer file at'):
        BPETokenizer.load(tmp_path/'nope.json')


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('vocab_size', [0, 200, 256])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(ConfigError, match=f'vocab_size must be greater than 256 \\(the byte tokens\\) \\+ 0 special token\\(s\\) = 256, got {vocab_size}'):
        BPETokenizer.train(["some text"], vocab_size=vocab_size)


def test_vocab_size_must_leave_room_for_specials():
    with pytest.raises(ConfigError, match='= 258, got 258'):
        BPETokenizer.train(["some text"], vocab_size=258, special_tokens=SPECIALS)


@pytest.mark.parametrize('texts', [[], [''], '', ['', '']])
def test_empty_corpus(texts):
    with pytest.raises(ValueError, match='cannot train a tokenizer on an empty corpus'):
        BPETokenizer.train(texts, vocab_size=300)


def test_non_string_documents():
    with pytest.raises(TypeError, match='texts must be strings, got int'):
        BPETokenizer.train(["ok", 3], vocab_size=300)


@pytest.mark.parametrize('bad', [800, 10**6, -1])
def test_decode_out_of_range(tok, bad):
    with pytest.raises(ValueError, match=f'token id {bad} is out of range: this tokenizer has ids 0..799'):
        tok.decode([5, bad])


def test_decode_non_int(tok):
    with pytest.raises(TypeError, match="token ids must be ints, got str 'a'"):
        tok.decode(['a'])


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key\\(s\\) for BPEConfig: 'vocab'"):
        BPEConfig.from_dict({'vocab': 1000})
    with pytest.raises(ConfigError, match="must be one of \\['gpt4', 'gpt2', 'none'\\]"):
        BPEConfig(pattern='bert')
    with pytest.raises(ConfigError, match='special_tokens must be distinct non-empty strings'):
        BPEConfig(special_tokens=['<a>', '<a>'])
    assert BPEConfig.from_yaml("vocab_size: 4096\npattern: gpt2\n").vocab_size == 4096


# ---- chat templates and added tokens ---------------------------------------------------------------------

CHAT_SPECIALS = ['<pad>', '<s>', '</s>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
            "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ '<|end|>' }}{% endgeneration %}{{ '\n' }}"
            "{% else %}{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(['system', 'user', 'assistant']), st.text(min_size=1, max_size=30)), min_size=1, max_size=5))
def test_assistant_mask_equals_transformers(tok, turns):
    from fttk.tokenization import assistant_mask, to_transformers
    chat = BPETokenizer(tok.merges, special_tokens=CHAT_SPECIALS)
    if 'hf' not in _HF: _HF['hf'] = to_transformers(chat, TEMPLATE, bos_token='<s>', eos_token='</s>', pad_token='<pad>')
    msgs = [{'role': r, 'content': c} for r, c in turns]
    ids, mask = assistant_mask(chat, TEMPLATE, msgs, bos_token='<s>')
    ref = _HF['hf'].apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref['input_ids'] and mask == ref['assistant_masks']
    want = ''.join(c + '<|end|>' for r, c in turns if r == 'assistant')
    # content that starts with whitespace merges with the template's newline before it into one token, which the
    # mask (HF's too, asserted above) gives to the assistant: the decoded text then starts with that newline
    if all(not c[:1].isspace() for r, c in turns if r == 'assistant'):
        assert chat.decode([i for i, m in zip(ids, mask) if m]) == want


def test_add_special_tokens_keeps_old_ids(tok):
    from fttk.tokenization import add_special_tokens
    bigger = add_special_tokens(tok, ['<|tool|>', '<|endoftext|>'])
    assert bigger.special_tokens['<|tool|>'] == tok.vocab_size and bigger.vocab_size == tok.vocab_size + 1
    s = "print('<|tool|>') <|endoftext|>"
    assert bigger.encode(s, allowed_special='none') == tok.encode(s, allowed_special='none')
    assert bigger.encode(s).count(tok.vocab_size) == 1


# ---- split patterns: unknown names refused, custom regexes lose nothing -----------------------------------

@pytest.mark.parametrize('name', ['bert', 'gtp4', 'GPT4', 'gpt-4', 'cl100k_base', ''])
def test_unknown_pattern_name_is_refused(name):
    msg = (f"unknown split pattern '{name}': the names are \\['gpt2', 'gpt4', 'none'\\] \\(or None for no split\\); "
           "anything else must be a regex")
    with pytest.raises(ValueError, match=msg): BPETokenizer(pattern=name)
    with pytest.raises(ValueError, match=msg): pre_split('hello world', name)
    with pytest.raises(ValueError, match=msg): count_chunks(['hello world'], name)
    with pytest.raises(ValueError, match=msg): train_hf(['hello world'], 300, name)


def test_bad_pattern_values():
    with pytest.raises(ValueError, match=r"split pattern '\(a' is not a valid regex: missing \) at position 2"):
        BPETokenizer(pattern='(a')
    with pytest.raises(TypeError, match='split pattern must be a str or None, got int 4'):
        BPETokenizer(pattern=4)


def test_pattern_names_and_regexes_are_the_same_tokenizer():
    assert BPETokenizer(pattern='gpt2').pattern == GPT2_SPLIT_PATTERN
    assert BPETokenizer(pattern=GPT4_SPLIT_PATTERN).pattern == GPT4_SPLIT_PATTERN
    assert BPETokenizer(pattern='none').pattern is None and BPETokenizer(pattern=None).pattern is None
    assert BPETokenizer(pattern='gpt4').encode('hello world') == [104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


CUSTOM_PATTERNS = [r'\p{L}+', r'\d', r'x*', r'\b', r'(?=a)', r' ?\p{L}+|\p{N}']


@pytest.mark.parametrize('pattern', CUSTOM_PATTERNS)
def test_custom_pattern_gaps_are_chunks_as_in_hf(pattern):
    "A regex that skips characters keeps them as chunks, like HF's Split(behavior='isolated')."
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(pattern), behavior='isolated')
    for s in ['hello world', "it's 42, ok!", 'axxbxa  b', 'aaa', '', ' \n\t', 'Grüße 🙂 x1y2']:
        assert pre_split(s, pattern) == [p for p, _ in split.pre_tokenize_str(s)]
        assert ''.join(pre_split(s, pattern)) == s


# `\b` is left out of the random-text check: HF's regex engine (Oniguruma) counts every number character
# (e.g. '¼', '²') as a word character, Python's `regex` only decimal digits, so they disagree on such text.
# Known difference, not yet handled by pre_split; the fixed strings above cover `\b` on ordinary text.
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([p for p in CUSTOM_PATTERNS if p != r'\b']), st.text(max_size=40))
def test_custom_pattern_roundtrip_and_equals_hf(tok, pattern, s):
    custom = BPETokenizer(tok.merges, pattern, SPECIALS)
    key = ('custom', pattern)
    if key not in _HF: _HF[key] = to_hf(custom)
    assert custom.decode(custom.encode(s)) == s
    assert custom.encode(s) == _HF[key].encode(s, add_special_tokens=False).ids


# ---- special tokens that HF could not give a new id -------------------------------------------------------

@pytest.mark.parametrize('special, msg', [
    ('a', "special token 'a' is spelled like vocabulary token 97 (b'a' in GPT-2's byte names)"),
    ('é', "special token 'é' is spelled like vocabulary token 233 (b'\\xe9' in GPT-2's byte names)"),
    ('Ġ', "special token 'Ġ' is spelled like vocabulary token 32 (b' ' in GPT-2's byte names)"),
])
def test_special_token_spelled_like_a_byte_token(special, msg):
    with pytest.raises(ValueError) as e: BPETokenizer(special_tokens=['<s>', special])
    assert str(e.value) == msg + ": HF tokenizers would give it that id instead of a new one; choose another spelling"


def test_special_token_spelled_like_a_learned_token(tok):
    the = tok.vocab.index(b' the')
    with pytest.raises(ValueError, match=f"special token 'Ġthe' is spelled like vocabulary token {the} \\(b' the'"):
        BPETokenizer(tok.merges, special_tokens=['Ġthe'])
    from fttk.tokenization import add_special_tokens
    with pytest.raises(ValueError, match=f"special token 'Ġthe' is spelled like vocabulary token {the}"):
        add_special_tokens(tok, ['Ġthe'])


@pytest.mark.parametrize('specials, exc, msg', [
    (['<a>', '<a>'], ValueError, "special token '<a>' is listed twice"),
    (['<a>', ''], ValueError, "special tokens must be non-empty strings, got ''"),
    (['<a>', 3], ValueError, 'special tokens must be non-empty strings, got 3'),
])
def test_bad_special_tokens(specials, exc, msg):
    with pytest.raises(exc, match=msg): BPETokenizer(special_tokens=specials)


# ---- one long chunk: the heap merge, equal to the simple loop and to HF ------------------------------------

@pytest.fixture(scope='module')
def tok_runs(corpus):
    "A tokenizer that learned long runs of letters, so long chunks merge deeply."
    return BPETokenizer.train(corpus[:20] + ['a' * 4096, 'abab' * 512, 'xyz' * 700], vocab_size=700)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet='aabxyzte', min_size=200, max_size=4000))
def test_long_chunk_heap_equals_simple_and_hf(tok_runs, s):
    from fttk.tokenization import bpe_merge_heap, bpe_merge_simple
    b = list(s.encode())
    assert bpe_merge_heap(b, tok_runs._ranks, tok_runs._merge_ids) == bpe_merge_simple(b, tok_runs._ranks, tok_runs._merge_ids)
    if 'runs' not in _HF: _HF['runs'] = to_hf(tok_runs)
    assert tok_runs.encode(s) == _HF['runs'].encode(s, add_special_tokens=False).ids


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(b'ab ')) , max_size=60))
def test_heap_equals_simple_short(tok_runs, b):
    from fttk.tokenization import bpe_merge_heap, bpe_merge_simple
    assert bpe_merge_heap(b, tok_runs._ranks, tok_runs._merge_ids) == bpe_merge_simple(b, tok_runs._ranks, tok_runs._merge_ids)


@pytest.mark.parametrize('text', ['a' * 65536, 'ab' * 32768,
                                  ''.join(__import__('random').Random(0).choices('abcdefghijklmnopqrstuvwxyz', k=65536))])
def test_64k_letter_chunk_equals_hf(tok_runs, text):
    "One 64 Ki-letter chunk: the quadratic loop took ~25 s here; the heap takes well under a second."
    if 'runs' not in _HF: _HF['runs'] = to_hf(tok_runs)
    ids = tok_runs.encode(text)
    assert ids == _HF['runs'].encode(text, add_special_tokens=False).ids
    assert tok_runs.decode(ids) == text


# ---- tokenizer files: every problem named, with the file ------------------------------------------------

@pytest.mark.parametrize('content, msg', [
    (b'', 'the file is empty'),
    (b'  \n', 'the file is empty'),
    (b'\xff\xfe{"format"', 'not UTF-8 text (byte 0 is 0xff)'),
    (b'{"format": "fttk-bpe", "version": 1, "merg', 'not valid JSON, truncated or damaged (Unterminated string starting at: line 1 column 38 (char 37))'),
    (b'merges:\n- [97, 97]\n', 'not valid JSON, truncated or damaged (Expecting value: line 1 column 1 (char 0))'),
    (b'[1, 2, 3]', 'not an fttk-bpe file (no "format": "fttk-bpe" key)'),
    (b'{"model": {"type": "BPE"}}', 'not an fttk-bpe file (no "format": "fttk-bpe" key)'),
    (b'{"format": "fttk-bpe", "version": "1"}', "unknown version '1'"),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "special_tokens": []}', "missing key 'merges'"),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": []}', "missing key 'special_tokens'"),
    (b'{"format": "fttk-bpe", "version": 1, "merges": [], "special_tokens": []}', "missing key 'pattern'"),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": "bert", "merges": [], "special_tokens": []}',
     "unknown split pattern 'bert'"),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": 3, "merges": [], "special_tokens": []}', 'pattern must be a string or null'),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": [[97, 97.0]], "special_tokens": []}',
     'merges must be a list of [id, id] pairs'),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": [[-1, 97]], "special_tokens": []}',
     'merge 0 (-1, 97) uses an id that does not exist yet (vocabulary has 256)'),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": [], "special_tokens": "<s>"}',
     'special_tokens must be a list of strings'),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": [], "special_tokens": ["<s>", "<s>"]}',
     "special token '<s>' is listed twice"),
    (b'{"format": "fttk-bpe", "version": 1, "pattern": null, "merges": [], "special_tokens": ["a"]}',
     "special token 'a' is spelled like vocabulary token 97"),
])
def test_bad_tokenizer_file(tmp_path, content, msg):
    p = tmp_path/'tok.json'
    p.write_bytes(content)
    with pytest.raises(CorruptFileError) as e: BPETokenizer.load(p)
    assert str(e.value).startswith(f"cannot read tokenizer from {p}: {msg}")


def test_tokenizer_path_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=f'{tmp_path} is a directory, not a tokenizer file'):
        BPETokenizer.load(tmp_path)


# ---- numeric and config arguments ----------------------------------------------------------------------

_BAD_INTS = [(1024.0, TypeError, 'must be an int, got float 1024.0'), (float('nan'), TypeError, 'must be an int, got float nan'),
             (float('inf'), TypeError, 'must be an int, got float inf'), ('1024', TypeError, "must be an int, got str '1024'"),
             (True, TypeError, 'must be an int, got bool True'), (None, TypeError, 'must be an int, got NoneType None')]


@pytest.mark.parametrize('trainer', [train_naive, train_incremental])
@pytest.mark.parametrize('value, exc, msg', _BAD_INTS + [(100, ValueError, 'must be >= 256, got 100')])
def test_trainer_vocab_size_checked(trainer, value, exc, msg):
    with pytest.raises(exc) as e: trainer({b'ab': 2}, value)
    assert str(e.value) == 'vocab_size ' + msg


@pytest.mark.parametrize('trainer', [train_naive, train_incremental])
@pytest.mark.parametrize('value, exc, msg', _BAD_INTS + [(0, ValueError, 'must be >= 1, got 0')])
def test_trainer_min_frequency_checked(trainer, value, exc, msg):
    with pytest.raises(exc) as e: trainer({b'ab': 2}, 300, value)
    assert str(e.value) == 'min_frequency ' + msg


def test_numpy_ints_are_ints():
    np = pytest.importorskip('numpy')
    assert train_incremental({b'ab': 2}, np.int64(257)) == train_incremental({b'ab': 2}, 257)


@pytest.mark.parametrize('value, exc, msg', _BAD_INTS[:3] + [(0, ValueError, 'must be >= 1, got 0')])
def test_docs_corpus_min_bytes_checked(value, exc, msg):
    with pytest.raises(exc) as e: docs_corpus(value)
    assert str(e.value) == 'min_bytes ' + msg


@pytest.mark.parametrize('value, exc, msg', _BAD_INTS[:3] + [(255, ValueError, 'must be >= 256, got 255')])
def test_train_hf_vocab_size_checked(value, exc, msg):
    with pytest.raises(exc) as e: train_hf(['some text'], value)
    assert str(e.value) == 'vocab_size ' + msg


@pytest.mark.parametrize('field, value, msg', [
    ('vocab_size', 1024.0, "config field 'vocab_size' expects int, got float 1024.0"),
    ('vocab_size', float('nan'), "config field 'vocab_size' expects int, got float nan"),
    ('vocab_size', float('inf'), "config field 'vocab_size' expects int, got float inf"),
    ('vocab_size', '1024', "config field 'vocab_size' expects int, got str '1024'"),
    ('min_frequency', 0, 'min_frequency must be >= 1, got 0'),
    ('min_frequency', 2.5, "config field 'min_frequency' expects int, got float 2.5"),
    ('trainer', 'fast', "config field 'trainer' must be one of \\['incremental', 'naive'\\], got 'fast'"),
    ('special_tokens', '<s>', "config field 'special_tokens' expects a list, got str '<s>'"),
])
def test_config_fields_checked(field, value, msg):
    with pytest.raises(ConfigError, match=msg): BPETokenizer.train(['some text'], **{field: value})


def test_train_cfg_argument_checked():
    with pytest.raises(TypeError, match='cfg must be a BPEConfig, got dict'):
        BPETokenizer.train(['some text'], {'vocab_size': 300})
    with pytest.raises(ValueError, match=r"give cfg or keyword settings, not both: \['vocab_size'\]"):
        BPETokenizer.train(['some text'], BPEConfig(vocab_size=300), vocab_size=400)


@pytest.mark.parametrize('merges, msg', [
    ([(97.0, 97)], 'merge 0 must be a pair of int token ids, got (97.0, 97)'),
    ([(97, 97), (True, 97)], 'merge 1 must be a pair of int token ids, got (True, 97)'),
    ([(97, 97, 97)], 'merge 0 must be a pair of int token ids, got (97, 97, 97)'),
    ([('97', '97')], "merge 0 must be a pair of int token ids, got ('97', '97')"),
])
def test_bad_merges(merges, msg):
    with pytest.raises(TypeError) as e: BPETokenizer(merges)
    assert str(e.value) == msg


def test_decode_numpy_and_torch_scalars(tok):
    np = pytest.importorskip('numpy')
    import torch
    assert tok.decode([np.int64(104), torch.tensor(105)]) == 'hi'
    with pytest.raises(TypeError, match='token ids must be ints, got float64'):
        tok.decode([np.float64(104.0)])
    with pytest.raises(TypeError, match=r'token ids must be ints, got Tensor tensor\(104.\)'):
        tok.decode([torch.tensor(104.0)])


def test_fertility_reference_must_be_a_text(tok):
    from fttk.tokenization import fertility
    with pytest.raises(ValueError, match=r"reference 'English' is not among the texts \['German'\]"):
        fertility(tok, {'German': 'Guten Tag'})
