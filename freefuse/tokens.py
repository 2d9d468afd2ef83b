"""Trigger phrase -> text-sequence positions, from tokenizer piece strings.

Pure string logic: the caller tokenises the prompt with the model's real tokenizer and passes the piece
strings (``convert_ids_to_tokens``), plus where each piece sits in the model's text sequence.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

# Markers tokenizers put on pieces: SentencePiece word start, CLIP BPE word end, GPT byte-level space.
_PIECE_MARKERS = ("\u2581", "</w>", "\u0120")

# Common English function words that carry no subject identity (compared lowercase).
# fmt: off
STOPWORDS: frozenset[str] = frozenset((
    "a", "an", "the",  # articles
    "and", "or", "but", "nor", "so", "yet",  # conjunctions
    "at", "by", "for", "from", "in", "into", "of", "on", "onto", "over", "through", "to", "under", "with",
    "above", "below", "before", "after", "between", "during",  # prepositions
    "my", "we", "our", "you", "your", "he", "him", "his", "she", "her", "it", "its", "they", "them", "their",
    "this", "that", "these", "those",  # pronouns, demonstratives
    "am", "is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "having",  # be / have
    "what", "which", "who", "whom", "whose", "where", "when", "while", "why", "how",  # wh-words
))
# fmt: on


@dataclass(frozen=True)
class PhraseMatch:
    """Where one phrase sits in a prompt's text sequence."""

    phrase: str
    positions: tuple[int, ...]  # sequence positions after filtering, sorted: what maps and bias use
    matched_positions: tuple[int, ...]  # every sequence position an occurrence covered, sorted
    occurrences: int

    @property
    def found(self) -> bool:
        return self.occurrences > 0


def clean_piece(piece: str) -> str:
    """Piece text without tokenizer word markers, stripped and lowercased."""
    for marker in _PIECE_MARKERS:
        piece = piece.replace(marker, "")
    return piece.strip().lower()


def _match_key(text: str) -> str:
    """Text as compared for matching: NFKC, lowercase, no whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(text.split())


def _filter_key(piece: str) -> str:
    """Piece text as judged by the filters: cleaned, with ASCII underscores removed too."""
    return clean_piece(piece).replace("_", "")


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def _is_dropped(piece: str, *, filter_meaningless: bool, filter_single_char: bool) -> bool:
    key = _filter_key(piece)
    if not key:
        return filter_meaningless or filter_single_char
    if filter_single_char and len(key) == 1:
        return True
    return filter_meaningless and (key in STOPWORDS or _is_punctuation(key))


def _fallback_piece(covered: list[int], pieces: Sequence[str]) -> int:
    """First covered piece with real non-punctuation text, else the first covered piece."""
    for i in covered:
        key = _filter_key(pieces[i])
        if key and not _is_punctuation(key):
            return i
    return covered[0]


def _word_edges(pieces: Sequence[str]) -> tuple[list[bool], list[bool]]:
    """Per piece: does a word start at it, does a word end at it.

    A word starts at a piece marked "\u2581"/"\u0120" (SentencePiece, GPT) or after a bare "\u2581", and after a
    CLIP piece ending in "</w>"; punctuation and "_" pieces separate words ("harry" is a word of "harry_potter").
    """
    keys = [clean_piece(p) for p in pieces]
    separator = [bool(k) and (_is_punctuation(k) or set(k) == {"_"}) for k in keys]
    marked = [p.startswith(("\u2581", "\u0120")) for p in pieces]  # a word starts here (maybe a bare marker)
    closes = [p.endswith("</w>") for p in pieces]  # a word ends here
    n = len(pieces)
    starts = [
        i == 0 or marked[i] or separator[i] or marked[i - 1] and not keys[i - 1] or closes[i - 1] or separator[i - 1]
        for i in range(n)
    ]
    ends = [i == n - 1 or closes[i] or separator[i] or marked[i + 1] or separator[i + 1] for i in range(n)]
    return starts, ends


def locate_phrase(
    pieces: Sequence[str],
    phrase: str,
    *,
    sequence_positions: Sequence[int] | None = None,
    filter_meaningless: bool = True,
    filter_single_char: bool = True,
) -> PhraseMatch:
    """Find every occurrence of ``phrase`` in the prompt's content pieces.

    ``pieces``: the prompt's content tokens in order (no BOS/EOS/padding). ``sequence_positions[i]``: where
    piece i sits in the model's text sequence (default i, as for T5 in FLUX, which has no BOS).
    Matching is case- and whitespace-insensitive on the concatenated cleaned piece text; an occurrence must
    start where a word starts and end where a word ends (``man`` does not match ``snowman`` or ``woman``;
    ``_`` and punctuation separate words). Each occurrence's covered pieces are then
    filtered (empty, single-character, stopword, punctuation); an occurrence that would lose every piece
    keeps its first piece with non-punctuation text (else its first piece).
    """
    target = _match_key(phrase)
    if not target:
        raise ValueError("phrase is empty or whitespace only")
    if sequence_positions is None:
        sequence_positions = range(len(pieces))
    if len(sequence_positions) != len(pieces):
        raise ValueError(f"{len(sequence_positions)} sequence positions for {len(pieces)} pieces")

    # Character span of every piece in the concatenated match text.
    keys = [_match_key(clean_piece(p)) for p in pieces]
    starts: list[int] = []
    offset = 0
    for key in keys:
        starts.append(offset)
        offset += len(key)
    text = "".join(keys)
    word_start, word_end = _word_edges(pieces)
    piece_starts = {starts[i] for i, key in enumerate(keys) if key and word_start[i]}
    piece_ends = {starts[i] + len(key) for i, key in enumerate(keys) if key and word_end[i]}

    matched: set[int] = set()
    kept: set[int] = set()
    occurrences = 0
    begin = text.find(target)
    while begin != -1:
        end = begin + len(target)
        if begin in piece_starts and end in piece_ends:
            occurrences += 1
            # Non-empty pieces inside the span, and empty pieces strictly inside it.
            covered = [
                i
                for i, key in enumerate(keys)
                if (key and begin <= starts[i] and starts[i] + len(key) <= end) or (not key and begin < starts[i] < end)
            ]
            matched.update(covered)
            survivors = [
                i
                for i in covered
                if not _is_dropped(
                    pieces[i], filter_meaningless=filter_meaningless, filter_single_char=filter_single_char
                )
            ]
            kept.update(survivors or [_fallback_piece(covered, pieces)])
        begin = text.find(target, begin + 1)

    return PhraseMatch(
        phrase=phrase,
        positions=tuple(sorted({int(sequence_positions[i]) for i in kept})),
        matched_positions=tuple(sorted({int(sequence_positions[i]) for i in matched})),
        occurrences=occurrences,
    )


def clip_content_pieces(
    chunk_pieces: Sequence[Sequence[str]],
    *,
    bos: str,
    eos: str,
    pad: str | None = None,
    chunk_length: int = 77,
) -> tuple[list[str], list[int]]:
    """Content pieces of a chunked CLIP prompt and their global sequence positions.

    Each chunk is laid out ``[BOS, up to 75 content pieces, EOS, padding...]`` and chunks are concatenated,
    so chunk-local content piece j sits at ``chunk * chunk_length + 1 + j``. A chunk's content ends at its
    first EOS; pieces equal to ``pad`` are skipped (Forge pads only after the EOS, so pass ``pad=None``
    there). Feed the result to ``locate_phrase`` so phrases crossing a chunk boundary still match.
    """
    content: list[str] = []
    positions: list[int] = []
    for c, chunk in enumerate(chunk_pieces):
        if len(chunk) > chunk_length:
            raise ValueError(f"chunk {c} has {len(chunk)} pieces, more than {chunk_length}")
        if not chunk or chunk[0] != bos:
            raise ValueError(f"chunk {c} does not start with the BOS piece {bos!r}")
        for j in range(1, len(chunk)):
            piece = chunk[j]
            if piece == eos:
                break
            if pad is not None and piece == pad:
                continue
            content.append(piece)
            positions.append(c * chunk_length + j)
    return content, positions


def overlapping_subjects(matches: Sequence[PhraseMatch]) -> list[tuple[int, int]]:
    """Index pairs (i < j) of subjects whose filtered positions intersect."""
    sets = [set(m.positions) for m in matches]
    return [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets)) if sets[i] & sets[j]]
