"""Server-side text preparation: whitespace cleanup and splitting long input into timed chunks.

Echo generates at most ~30 s of audio per generation and reads at most 768 bytes (UTF-8 text
plus one BOS byte), so the server cuts long input into chunks and generates them in order.

Pipeline (what `split_into_chunks` does):

1. `prepare_text`: lone UTF-16 surrogates become U+FFFD, control characters and byte-order
   marks are removed, every run of whitespace becomes one space (one newline where it holds a
   line break: a line's end is a place to cut; chunks' texts have a space there), the ends are
   stripped.
   Everything else, non-ASCII included, is kept (the model reads UTF-8 bytes). Echo's own
   normalisation (`inference.normalize_text`) is *not* applied here; it runs later, per chunk,
   in the tokenizer.
2. The prepared text is cut into *pieces*: sentences (and speaker turns: every `[S<n>]` tag
   starts a new piece). A sentence ends at `. ! ? ‽` (and the Devanagari danda, the Arabic
   question mark, the Urdu full stop) before a space, or at a CJK full stop; not at a title or
   common abbreviation ("Dr.", "Sen.", "e.g."), an initial, "No." or a month before a number, or a
   '.' before a lowercase word. A sentence is split further only when it alone is over the time maximum
   or over the byte limit: first at clause boundaries (`, ; :`, their Arabic and CJK forms, dashes,
   ellipses, line ends), then at word boundaries (spaces), and a single giant "word" at character
   boundaries (never inside a speaker tag, and not in front of a combining mark, a variation
   selector or a zero-width joiner, so emoji sequences and accents stay whole where possible).
3. Pieces are packed greedily, in order, into chunks (the fork's rule): the next piece joins the
   current chunk when the result stays at or under the target, or when the current chunk is still
   under the minimum and the result stays at or under the maximum; otherwise a new chunk starts.
   A piece never joins a chunk if the result would break the byte limit.
4. Tail: a last chunk shorter than the minimum is merged into the previous chunk when the merged
   chunk stays at or under the maximum and within the byte limit; otherwise whole pieces are moved
   from the end of the previous chunk to the tail while the tail is under the minimum and the
   previous chunk stays at least as long as the tail (so the two end up balanced).

Duration estimate (same as the original fork's server): for a piece of text with speaker tags
removed, `max(characters / chars_per_second, words / words_per_second)`, where characters are
Unicode code points (spaces included, whitespace runs counted once) and words are
whitespace-separated tokens (at least 1 for non-empty text). The larger of the two estimates is
used so that chunks are not packed too aggressively. Empty text is 0 s.

Byte limit: every chunk's `text`, as the tokenizer will see it (after `normalize_text`, which may
add `[S1] `, when `normalize=True`), plus the BOS byte, is at most `MAX_TEXT_LENGTH` (768) bytes.

Speaker tags: Echo dialogue marks turns with inline `[S1]`, `[S2]`, ... tags. A chunk that starts
in the middle of a speaker's turn gets that speaker's tag prefixed (`"[S2] " + body`), so the
voice stays right and normalisation does not wrongly add `[S1]`. A chunk that starts with a tag
of its own gets no prefix; nor does one that starts before the first tag of the text, unless
normalisation would leave it with no speaker at all (it starts with `(` or `[`, or holds `S1` or
`S2`, as in "PS2"): a chunk after the first then gets `[S1]`, the tag normalisation gives an
untagged text, so the voice does not change mid-text. (In `continue` mode the engine joins the
previous chunk as it was read alone, its own tag first, before such a chunk.)

Continuation (`continuation=True`, the engine's `continue` chunk mode): chunk k is generated
after chunk k-1's audio, prompted with both texts, and the two share one 640-frame (29.7 s)
generation. The time goals are halved and capped at CONTINUATION_MAX_SECONDS (two chunks at
most 26 s, a 12% margin for the estimate), and each chunk is at most half the byte limit
(`CONTINUATION_MAX_BYTES`, BOS included), so two neighbours fit one prompt.

No text is lost: the chunk spans (`TextChunk.start`/`end`) tile the prepared text exactly, and
each chunk's text is its carried tag (if any) followed by its span with the whitespace at the
joins stripped.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from inference import MAX_TEXT_LENGTH, normalize_text

# How the chunks of one answer are generated: each on its own (the fork's way), or each continuing
# the latents of the one before it, with one decoder for the whole answer (engine.py)
ChunkMode = Literal["independent", "continue"]

__all__ = [
    "CONTINUATION_MAX_BYTES",
    "CONTINUATION_MAX_SECONDS",
    "ChunkSettings",
    "ChunkSettingsError",
    "MAX_TEXT_LENGTH",
    "SPEAKER_TAG_RE",
    "TextChunk",
    "estimate_seconds",
    "fits_in_one_generation",
    "generation_bytes",
    "plan_chunks",
    "prepare_text",
    "split_into_chunks",
    "split_to_fit",
]

SPEAKER_TAG_RE = re.compile(r"\[S\d+\]")
_DEFAULT_TAG = "[S1] "  # what `normalize_text` puts before a text that names no speaker

# Control characters (except whitespace, which is collapsed) and the BOM are removed.
_REMOVED_CHARS = {
    cp: None for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0xFEFF] if not chr(cp).isspace()
}
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_WHITESPACE_RE = re.compile(r"\s+")  # (the characters str.split() splits at)
_LINE_BREAK_RE = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # (where str.splitlines() splits)

# A run of sentence punctuation written before a space (Latin's, and the Devanagari danda, the Arabic
# question mark, the Urdu full stop), optional closing quotes/brackets, then a space or the end.
# (the look-behind starts a match only at a run's first mark: tried from every mark of a long run, the
# pattern cost the square of its length, 0.27 s for 4,096 dots, holding the GIL)
_LATIN_END_RE = re.compile(r"(?<![.!?\u203d\u0964\u0965\u061f\u06d4])([.!?\u203d\u0964\u0965\u061f\u06d4]+)"
                           r"([\"'\u201d\u2019\u00bb)\]]*)(?=\s|$)")
# CJK full stops need no following space.
_CJK_END_RE = re.compile(r"[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019\uff09)]*")
# Clause ends: Latin (and Arabic) comma/semicolon/colon before a space, CJK forms anywhere, dashes,
# ellipses.
_CLAUSE_RE = re.compile(
    r"[,;:\u060c\u061b](?=\s)"
    r"|[\u3001\uff0c\uff1b\uff1a]"
    r"|[\u2014\u2013]+"
    r"|(?<=\s)-{1,2}(?=\s)|--"
    r"|\u2026+"
)
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "rev", "hon", "st", "etc", "e.g", "i.e", "vs", "approx",
    "dept", "jr", "sr", "u.s", "u.k", "a.m", "p.m", "fig", "mt", "lt", "gen", "col", "sgt",
    "sen", "rep", "gov", "pres", "capt", "cmdr", "adm", "maj", "supt", "ph.d", "ave", "blvd",
})
# Abbreviations only before a number ("No. 5", "Jan. 3"): "Oh no." ends a sentence
_ABBREVIATIONS_BEFORE_NUMBERS = frozenset({
    "no", "nos", "vol", "vols", "ch", "pp", "jan", "feb", "aug", "sept", "oct", "nov", "dec",
})
_OPENERS = "\"'([\u201c\u2018\u00ab"

# Boundary levels: pieces are cut at sentences, then clauses, then words, then characters.
_SENTENCE, _CLAUSE, _WORD = 3, 2, 1

CONTINUATION_MAX_SECONDS = 13.0  # two chunks of continue mode: at most 26 s of the 640-frame window
# The speaking rates a request or the operator may give (ECHO_CHUNK_*_PER_SECOND): a rate near 0 would
# cut text into one-letter chunks (ChunkSettings itself takes any positive rate)
CHARS_PER_SECOND_RANGE = (1.0, 1000.0)
WORDS_PER_SECOND_RANGE = (0.1, 100.0)
CONTINUATION_MAX_BYTES = MAX_TEXT_LENGTH // 2  # two chunks' tokens (each with its BOS) fit one prompt


class ChunkSettingsError(ValueError):
    """An invalid chunking setting; `param` names the request field (e.g. `chunk_max_seconds`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.param = f"chunk_{field}"


@dataclass(frozen=True)
class ChunkSettings:
    """Chunk sizes in estimated seconds of speech and the speaking rates used to estimate them.

    All values must be > 0 (and not NaN); `min_seconds <= max_seconds`. The seconds may be
    `math.inf` (no limit; only the byte limit then applies). A target outside
    [min_seconds, max_seconds] is clamped into it (so overriding only `max_seconds=25` works).
    """

    target_seconds: float = 30.0
    min_seconds: float = 20.0
    max_seconds: float = 40.0
    chars_per_second: float = 14.0
    words_per_second: float = 2.7

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ChunkSettingsError(field.name, f"chunk_{field.name} must be a number, got {value!r}")
            if math.isnan(value) or value <= 0:
                raise ChunkSettingsError(field.name, f"chunk_{field.name} must be > 0, got {value!r}")
        for name in ("chars_per_second", "words_per_second"):
            if math.isinf(getattr(self, name)):
                raise ChunkSettingsError(name, f"chunk_{name} must be finite")
        if self.min_seconds > self.max_seconds:
            raise ChunkSettingsError(
                "min_seconds",
                f"chunk_min_seconds ({self.min_seconds}) must not exceed chunk_max_seconds ({self.max_seconds})")

    @property
    def effective_target_seconds(self) -> float:
        return min(max(self.target_seconds, self.min_seconds), self.max_seconds)

    def for_continuation(self) -> ChunkSettings:
        """Goals for chunks that continue one another: halved, at most CONTINUATION_MAX_SECONDS."""
        def cut(seconds: float) -> float:
            half = seconds / 2
            return min(half if half > 0 else seconds, CONTINUATION_MAX_SECONDS)  # the smallest float halves to 0
        return dataclasses.replace(self, target_seconds=cut(self.target_seconds), min_seconds=cut(self.min_seconds),
                                   max_seconds=cut(self.max_seconds))


@dataclass(frozen=True)
class TextChunk:
    """One generation's text.

    `text` is what to synthesise: `speaker_tag + " " + body` when a tag is carried over, else
    `body`. `body` is `prepared[start:end].strip()`; the spans of consecutive chunks are adjacent
    and together cover the prepared text.
    """

    text: str
    body: str
    start: int
    end: int
    speaker_tag: str | None
    estimated_seconds: float


def prepare_text(text: str, keep_lines: bool = False) -> str:
    """The cleanup the server applies before chunking: lone surrogates -> U+FFFD, control
    characters and BOMs removed, whitespace runs (any Unicode whitespace, newlines included)
    collapsed to one space, ends stripped. Non-ASCII text is kept. Idempotent.

    `keep_lines`: a run that holds a line break becomes one newline instead, at the same place (a
    line of a poem, a list or a song is a place to cut; chunks' texts have spaces there)."""
    text = _SURROGATE_RE.sub("\ufffd", text)
    text = text.translate(_REMOVED_CHARS)
    if not keep_lines:
        return " ".join(text.split())
    return _WHITESPACE_RE.sub(lambda m: "\n" if _LINE_BREAK_RE.search(m.group()) else " ", text).strip()


_EXCLAMATIONS_RE = re.compile(r"!+")


def normalize_exclamations(text: str) -> str:
    """A single "!" becomes "." and a run of them one "!" (the fork's ECHO_NORMALIZE_EXCLAMATION:
    the model over-acts single exclamation marks)."""
    return _EXCLAMATIONS_RE.sub(lambda m: "!" if len(m.group()) > 1 else ".", text)


def estimate_seconds(text: str, chars_per_second: float = 14.0, words_per_second: float = 2.7) -> float:
    """Estimated speaking time: max(characters / chars_per_second, words / words_per_second),
    speaker tags excluded, whitespace runs counted as one character; 0 for empty text."""
    spoken = " ".join(SPEAKER_TAG_RE.sub(" ", text).split())
    if not spoken:
        return 0.0
    words = spoken.count(" ") + 1
    return max(len(spoken) / chars_per_second, words / words_per_second)


def generation_bytes(text: str, normalize: bool = True) -> int:
    """Tokens the model will read for `text`: its UTF-8 bytes (after `normalize_text` when
    `normalize`) plus the BOS token. Compare with `MAX_TEXT_LENGTH`."""
    if normalize:
        text = normalize_text(text)
    return 1 + len(text.encode("utf-8", "surrogatepass"))


def fits_in_one_generation(text: str, normalize: bool = True) -> bool:
    """Whether `text` (as given; pass it through `prepare_text` first to match what the server
    generates) fits the model's 768-token limit, BOS and `normalize_text` included. Use it when
    chunking is disabled to reject (400) or `split_to_fit` an over-long input instead of letting
    the tokenizer truncate it."""
    return generation_bytes(text, normalize) <= MAX_TEXT_LENGTH


def plan_chunks(text: str, settings: ChunkSettings | None = None, *, normalize: bool = True,
                continuation: bool = False) -> list[TextChunk]:
    """Prepare `text` and split it into chunks (see the module docstring). Spans refer to
    `prepare_text(text)`. Empty (or whitespace-only) input gives []. `normalize` says whether the
    chunks will be tokenised with `normalize_text` (it only affects the byte accounting).
    `continuation`: chunks small enough that each, with the one before it, fits one generation."""
    prepared = prepare_text(text, keep_lines=True)
    if not prepared:
        return []
    settings = settings or ChunkSettings()
    if continuation:
        return _Planner(prepared, settings.for_continuation(), normalize, CONTINUATION_MAX_BYTES).plan()
    return _Planner(prepared, settings, normalize).plan()


def split_into_chunks(text: str, settings: ChunkSettings | None = None, *,
                      target_seconds: float | None = None, min_seconds: float | None = None,
                      max_seconds: float | None = None, chars_per_second: float | None = None,
                      words_per_second: float | None = None, normalize: bool = True,
                      continuation: bool = False) -> list[str]:
    """The texts to generate, in order. Keyword values override the fields of `settings`
    (default `ChunkSettings()`); invalid values raise `ChunkSettingsError` (a ValueError).
    `continuation`: sized for the `continue` chunk mode (see the module docstring)."""
    settings = settings or ChunkSettings()
    overrides = {k: v for k, v in dict(target_seconds=target_seconds, min_seconds=min_seconds,
                                       max_seconds=max_seconds, chars_per_second=chars_per_second,
                                       words_per_second=words_per_second).items() if v is not None}
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    return [chunk.text for chunk in plan_chunks(text, settings, normalize=normalize, continuation=continuation)]


_UNLIMITED = ChunkSettings(target_seconds=math.inf, min_seconds=math.inf, max_seconds=math.inf)


def split_to_fit(text: str, *, normalize: bool = True) -> list[str]:
    """Split only as far as the byte limit requires (no time limits): as few chunks as the greedy
    packing gives, cut at sentence boundaries where possible. For an unchunked request whose
    input does not fit one generation. One chunk when it fits."""
    return [chunk.text for chunk in plan_chunks(text, _UNLIMITED, normalize=normalize)]


# ---------------------------------------------------------------------------------------------


class _Planner:
    def __init__(self, text: str, settings: ChunkSettings, normalize: bool, max_bytes: int = MAX_TEXT_LENGTH):
        self.text = text
        self.max_bytes = max_bytes
        self.settings = settings
        self.normalize = normalize
        self.target = settings.effective_target_seconds
        self.tags = list(SPEAKER_TAG_RE.finditer(text))
        self.tag_starts = [m.start() for m in self.tags]
        self.cuts = self._find_cuts()

    # -- boundaries -----------------------------------------------------------------------------

    def _canon(self, pos: int) -> int:
        """A cut position with the space before it moved into the following piece."""
        while pos > 0 and self.text[pos - 1] in " \n":
            pos -= 1
        return pos

    def _find_cuts(self) -> dict[int, list[int]]:
        text, n = self.text, len(self.text)
        levels: dict[int, set[int]] = {_SENTENCE: set(), _CLAUSE: set(), _WORD: set()}
        for m in _LATIN_END_RE.finditer(text):
            punct = m.group(1)
            if set(punct) == {"."} and len(punct) > 1:
                levels[_CLAUSE].add(m.end())  # an ellipsis pauses, it does not end a sentence
            elif punct == "." and not self._ends_sentence(m.start(), m.end()):
                continue
            else:
                levels[_SENTENCE].add(m.end())
        for m in _CJK_END_RE.finditer(text):
            levels[_SENTENCE].add(m.end())
        for m in self.tags:  # a speaker turn starts a new piece
            levels[_SENTENCE].add(m.start())
        for m in _CLAUSE_RE.finditer(text):
            levels[_CLAUSE].add(m.end())
        breaks = [i for i, ch in enumerate(text) if ch in " \n"]
        levels[_WORD].update(breaks)
        levels[_CLAUSE].update(i for i in breaks if text[i] == "\n")  # a line ends
        cuts = {}
        for level, positions in levels.items():
            canon = {self._canon(p) for p in positions}
            cuts[level] = sorted(p for p in canon if 0 < p < n and not self._inside_tag(p))
        return cuts

    def _ends_sentence(self, dot: int, end: int) -> bool:
        """Whether a single '.' at `dot` ends a sentence (not an abbreviation or an initial, and
        not followed by a lowercase word)."""
        text = self.text
        word_start = max(text.rfind(" ", 0, dot), text.rfind("\n", 0, dot)) + 1
        word = text[word_start:dot].lstrip(_OPENERS).lower()
        following = text[end + 1:end + 2]
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return False
        if word in _ABBREVIATIONS_BEFORE_NUMBERS and following.isdigit():
            return False
        return not (following and following.islower())

    def _inside_tag(self, pos: int) -> bool:
        i = bisect.bisect_left(self.tag_starts, pos) - 1  # last tag starting before pos
        return i >= 0 and self.tags[i].end() > pos

    # -- measures of a candidate chunk [start, end) ----------------------------------------------

    def carried_tag(self, start: int, body: str) -> str | None:
        if SPEAKER_TAG_RE.match(body):
            return None
        i = bisect.bisect_left(self.tag_starts, start) - 1
        if i >= 0:
            return self.tags[i].group()
        if self.normalize and start > 0 and not normalize_text(body).startswith(_DEFAULT_TAG):
            return _DEFAULT_TAG.strip()  # (the speaker normalisation gives a text that names none)
        return None

    def chunk_text(self, start: int, end: int) -> tuple[str, str, str | None]:
        body = self.text[start:end].strip().replace("\n", " ")
        tag = self.carried_tag(start, body)
        return (f"{tag} {body}" if tag else body), body, tag

    def chunk(self, start: int, end: int) -> TextChunk:
        text, body, tag = self.chunk_text(start, end)
        return TextChunk(text=text, body=body, start=start, end=end, speaker_tag=tag,
                         estimated_seconds=self.seconds(start, end))

    def seconds(self, start: int, end: int) -> float:
        s = self.settings
        return estimate_seconds(self.text[start:end], s.chars_per_second, s.words_per_second)

    def fits(self, start: int, end: int) -> bool:
        return generation_bytes(self.chunk_text(start, end)[0], self.normalize) <= self.max_bytes

    def acceptable(self, start: int, end: int, limit: float) -> bool:
        return self.seconds(start, end) <= limit and self.fits(start, end)

    # -- pieces ------------------------------------------------------------------------------------

    def pieces(self) -> list[tuple[int, int]]:
        bounds = [0, *self.cuts[_SENTENCE], len(self.text)]
        out: list[tuple[int, int]] = []
        for a, b in zip(bounds, bounds[1:]):
            out.extend(self._split_piece(a, b, _CLAUSE))
        return out

    def _split_piece(self, start: int, end: int, level: int) -> list[tuple[int, int]]:
        if self.acceptable(start, end, self.settings.max_seconds):
            return [(start, end)]
        while level >= _WORD:
            positions = self.cuts[level]
            inner = positions[bisect.bisect_right(positions, start):bisect.bisect_left(positions, end)]
            if inner:
                bounds = [start, *inner, end]
                out: list[tuple[int, int]] = []
                for a, b in zip(bounds, bounds[1:]):
                    out.extend(self._split_piece(a, b, level - 1))
                return out
            level -= 1
        return self._split_characters(start, end)

    def _split_characters(self, start: int, end: int) -> list[tuple[int, int]]:
        """A piece with no space inside (except maybe a leading one), cut at code point boundaries
        into parts of at most the target duration that fit the byte limit."""
        out = []
        pos = start
        while True:
            first = pos + 2 if self.text[pos] in " \n" else pos + 1  # shortest part with a character
            if first >= end or self.acceptable(pos, end, self.settings.max_seconds):
                break
            lo, hi, best = first, end - 1, first
            while lo <= hi:
                mid = (lo + hi) // 2
                if self.acceptable(pos, mid, self.target):
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            cut = self._safe_cut(first, best, end)
            if cut != best and not self.fits(pos, cut):
                cut = best
            if cut >= end:
                break
            out.append((pos, cut))
            pos = cut
        out.append((pos, end))
        return out

    def _safe_cut(self, first: int, cut: int, end: int) -> int:
        """`cut` moved out of a speaker tag (to the tag's end: tags only open a piece) and back off
        combining marks, variation selectors and zero-width-joiner sequences, never below
        `first`."""
        text = self.text
        i = bisect.bisect_left(self.tag_starts, cut) - 1
        if i >= 0 and self.tags[i].end() > cut:
            return min(self.tags[i].end(), end)
        c = cut
        while c > first and (_joins_previous(text[c]) or text[c - 1] == "\u200d"):
            c -= 1
        return c if not (_joins_previous(text[c]) or text[c - 1] == "\u200d") else cut

    # -- packing -----------------------------------------------------------------------------------

    def plan(self) -> list[TextChunk]:
        s = self.settings
        groups: list[list[tuple[int, int]]] = []
        for piece in self.pieces():
            if groups:
                current = groups[-1]
                start = current[0][0]
                current_seconds = self.seconds(start, current[-1][1])
                joined_seconds = self.seconds(start, piece[1])
                wanted = joined_seconds <= self.target or (current_seconds < s.min_seconds
                                                           and joined_seconds <= s.max_seconds)
                if wanted and self.fits(start, piece[1]):
                    current.append(piece)
                    continue
            groups.append([piece])
        self._fix_tail(groups)
        return [self.chunk(g[0][0], g[-1][1]) for g in groups]

    def _fix_tail(self, groups: list[list[tuple[int, int]]]) -> None:
        s = self.settings
        if len(groups) < 2:
            return
        prev, tail = groups[-2], groups[-1]
        if self.seconds(tail[0][0], tail[-1][1]) >= s.min_seconds:
            return
        if self.acceptable(prev[0][0], tail[-1][1], s.max_seconds):
            groups[-2:] = [prev + tail]
            return
        while len(prev) > 1 and self.seconds(tail[0][0], tail[-1][1]) < s.min_seconds:
            moved = prev[-1]
            new_tail_seconds = self.seconds(moved[0], tail[-1][1])
            if (new_tail_seconds > s.max_seconds or not self.fits(moved[0], tail[-1][1])
                    or not self.fits(prev[0][0], moved[0])
                    or self.seconds(prev[0][0], moved[0]) < new_tail_seconds):
                break
            tail.insert(0, prev.pop())


def _joins_previous(ch: str) -> bool:
    """Characters that belong to the grapheme before them (combining marks, ZWJ, variation
    selectors, emoji skin-tone modifiers)."""
    return (unicodedata.combining(ch) != 0 or unicodedata.category(ch) in ("Mn", "Me", "Mc")
            or ch == "\u200d" or "\ufe00" <= ch <= "\ufe0f" or "\U0001f3fb" <= ch <= "\U0001f3ff")
