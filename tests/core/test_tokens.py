"""Trigger phrase -> token positions, on piece lists as the real tokenizers produce them.

T5 pieces below come from the T5 (SD3 tokenizer_3 / FLUX t5xxl) SentencePiece tokenizer, CLIP pieces from the
CLIP BPE tokenizer (both with add_special_tokens=False).
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freefuse.tokens import (
    PhraseMatch,
    clean_piece,
    clip_content_pieces,
    locate_phrase,
    overlapping_subjects,
)

# fmt: off
# "harry_potter and daiyu_lin hugging"
T5_HARRY_DAIYU = [
    "▁", "har", "ry", "_", "pot", "ter", "▁and", "▁da", "i", "y", "u", "_", "l", "in", "▁hug", "ging",
]
# "ohwx man"
T5_OHWX_MAN = ["▁", "o", "h", "w", "x", "▁man"]
# "a woman and a man"
T5_WOMAN_MAN = ["▁", "a", "▁woman", "▁and", "▁", "a", "▁man"]
# "A photo of a cat. A Cat!"
T5_CATS = ["▁A", "▁photo", "▁of", "▁", "a", "▁cat", ".", "▁A", "▁Cat", "!"]
# "harry_potter and daiyu_lin hugging"
CLIP_HARRY_DAIYU = [
    "harry</w>", "_</w>", "potter</w>", "and</w>", "dai", "yu</w>", "_</w>", "lin</w>", "hugging</w>",
]
# fmt: on

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# --- clean_piece ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("piece", "cleaned"),
    [
        ("▁Harry", "harry"),
        ("potter</w>", "potter"),
        ("ĠPotter", "potter"),
        ("▁", ""),
        ("_</w>", "_"),
        ("ter", "ter"),
    ],
)
def test_clean_piece_strips_word_markers_and_lowercases(piece, cleaned):
    assert clean_piece(piece) == cleaned


# --- T5 (FLUX): token i is text position i --------------------------------------------------------


def test_t5_multi_piece_word_keeps_its_content_pieces():
    match = locate_phrase(T5_HARRY_DAIYU, "harry_potter")
    assert match.found and match.occurrences == 1
    # the leading bare "▁" (index 0) lies before the phrase; "_" (3) is covered but filtered
    assert match.matched_positions == (1, 2, 3, 4, 5)
    assert match.positions == (1, 2, 4, 5)


def test_t5_single_character_pieces_are_dropped_but_the_word_stays():
    match = locate_phrase(T5_HARRY_DAIYU, "daiyu_lin")
    assert match.matched_positions == tuple(range(7, 14))
    # "i", "y", "u", "_", "l" are single characters and "in" is a stopword: only "▁da" is left
    assert match.positions == (7,)


def test_filters_can_be_switched_off():
    match = locate_phrase(T5_HARRY_DAIYU, "daiyu_lin", filter_meaningless=False, filter_single_char=False)
    assert match.positions == match.matched_positions == tuple(range(7, 14))

    only_meaningless = locate_phrase(T5_HARRY_DAIYU, "daiyu_lin", filter_single_char=False)
    # "_" (empty once "_" is stripped) and the stopword "in" go; single characters stay
    assert only_meaningless.positions == (7, 8, 9, 10, 12)


def test_rare_trigger_split_into_characters_falls_back_to_its_first_character():
    match = locate_phrase(T5_OHWX_MAN, "ohwx")
    assert match.matched_positions == (1, 2, 3, 4)  # not the bare "▁" before it
    assert match.positions == (1,)  # every piece is one character: keep the first one with text


def test_rare_trigger_with_a_real_word_keeps_only_the_word():
    match = locate_phrase(T5_OHWX_MAN, "ohwx man")
    assert match.matched_positions == (1, 2, 3, 4, 5)
    assert match.positions == (5,)


def test_man_does_not_match_inside_woman():
    match = locate_phrase(T5_WOMAN_MAN, "man")
    assert match.occurrences == 1
    assert match.positions == (6,)
    clip = locate_phrase(["a</w>", "woman</w>", "and</w>", "a</w>", "man</w>"], "man")
    assert clip.positions == (4,)


def test_phrase_must_end_at_a_piece_end():
    assert not locate_phrase(["▁mango", "▁man"], "mang").found
    assert not locate_phrase(T5_HARRY_DAIYU, "harry_pot_").found


def test_matching_ignores_case_and_whitespace_layout():
    lower = locate_phrase(T5_CATS, "a cat")
    upper = locate_phrase(T5_CATS, "  A   CAT ")
    assert lower.occurrences == upper.occurrences == 2  # "a cat" and "A Cat"
    assert lower.positions == upper.positions == (5, 8)  # the "a"/"A" pieces are stopwords
    assert lower.matched_positions == (4, 5, 7, 8)


def test_every_occurrence_counts():
    pieces = ["▁", "a", "▁man", ",", "▁the", "▁man"]  # "a man, the man"
    match = locate_phrase(pieces, "man")
    assert match.occurrences == 2
    assert match.positions == (2, 5)


def test_absent_phrase_is_an_explicit_not_found_result():
    match = locate_phrase(T5_HARRY_DAIYU, "hermione")
    assert match == PhraseMatch("hermione", positions=(), matched_positions=(), occurrences=0)
    assert not match.found


def test_stopword_only_phrase_keeps_its_first_piece_per_occurrence():
    match = locate_phrase(T5_WOMAN_MAN, "and")
    assert match.positions == (3,)
    the = locate_phrase(["▁in", "▁the", "▁park"], "in the")
    assert the.matched_positions == (0, 1)
    assert the.positions == (0,)


def test_fallback_skips_punctuation_and_bare_underscores():
    assert locate_phrase(["▁park", ",", "▁the", "▁dog"], ", the").positions == (2,)
    assert locate_phrase(["▁x", "_", "▁of"], "_ of").positions == (2,)


def test_punctuation_only_phrase_keeps_its_first_piece():
    match = locate_phrase(["▁park", "...", "▁dog"], "...")
    assert match.positions == (1,)


@pytest.mark.parametrize("phrase", ["", "   ", "\t\n"])
def test_empty_phrase_is_rejected(phrase):
    with pytest.raises(ValueError):
        locate_phrase(T5_HARRY_DAIYU, phrase)


def test_sequence_positions_translate_piece_indices():
    match = locate_phrase(["▁dog", "▁cat"], "cat", sequence_positions=[10, 20])
    assert match.positions == (20,)
    with pytest.raises(ValueError):
        locate_phrase(["▁dog", "▁cat"], "cat", sequence_positions=[10])


# --- CLIP (SDXL): chunked layout ------------------------------------------------------------------


def _chunk(content: list[str]) -> list[str]:
    """One Forge CLIP chunk: BOS, content, EOS padding to 77."""
    assert len(content) <= 75
    return [BOS, *content] + [EOS] * (76 - len(content))


def test_clip_bpe_pieces_match_with_positions_after_bos():
    pieces, positions = clip_content_pieces([_chunk(CLIP_HARRY_DAIYU)], bos=BOS, eos=EOS)
    assert pieces == CLIP_HARRY_DAIYU
    assert positions == list(range(1, 10))
    harry = locate_phrase(pieces, "Harry_Potter", sequence_positions=positions)
    daiyu = locate_phrase(pieces, "daiyu_lin", sequence_positions=positions)
    assert harry.positions == (1, 3)  # "harry", "potter"; "_" dropped
    assert daiyu.positions == (5, 6, 8)


def test_clip_positions_in_later_chunks_skip_each_chunks_bos_and_eos():
    first = [f"w{i}</w>" for i in range(70)]  # a chunk ended early (comma backtrack), EOS-padded
    chunks = [_chunk(first), _chunk(["ohwx</w>", "man</w>"])]
    pieces, positions = clip_content_pieces(chunks, bos=BOS, eos=EOS)
    assert positions[:70] == list(range(1, 71))
    assert positions[70:] == [78, 79]  # chunk 1 content j sits at 77 + 1 + j
    assert locate_phrase(pieces, "ohwx man", sequence_positions=positions).positions == (78, 79)


def test_clip_phrase_crossing_a_chunk_boundary_still_matches():
    filler = [f"w{i}</w>" for i in range(74)]
    chunks = [_chunk([*filler, "harry</w>"]), _chunk(["_</w>", "potter</w>", "smiling</w>"])]
    pieces, positions = clip_content_pieces(chunks, bos=BOS, eos=EOS)
    match = locate_phrase(pieces, "harry_potter", sequence_positions=positions)
    assert match.matched_positions == (75, 78, 79)  # ... harry | EOS(76) BOS(77) | _ potter
    assert match.positions == (75, 79)


def test_clip_pad_pieces_are_skipped_and_positions_kept():
    chunk = [BOS, "dog</w>", "!", "cat</w>", EOS] + ["!"] * 72
    pieces, positions = clip_content_pieces([chunk], bos=BOS, eos=EOS, pad="!")
    assert pieces == ["dog</w>", "cat</w>"]
    assert positions == [1, 3]


def test_clip_chunk_without_bos_is_rejected():
    with pytest.raises(ValueError):
        clip_content_pieces([["dog</w>", EOS]], bos=BOS, eos=EOS)


# --- overlaps -------------------------------------------------------------------------------------


def test_overlapping_subjects_reports_pairs_sharing_positions():
    harry = locate_phrase(T5_HARRY_DAIYU, "harry_potter")
    potter = locate_phrase(T5_HARRY_DAIYU, "potter")
    daiyu = locate_phrase(T5_HARRY_DAIYU, "daiyu_lin")
    assert overlapping_subjects([harry, daiyu, potter]) == [(0, 2)]
    assert overlapping_subjects([harry, daiyu]) == []


# --- properties -----------------------------------------------------------------------------------

WORDS = ["cat", "dog", "man", "woman", "ohwx", "red", "the", "a", "hat"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), st.sampled_from(WORDS))
def test_whole_word_matches_agree_with_word_count(words, target):
    pieces = [f"▁{w}" for w in words]
    match = locate_phrase(pieces, target)
    assert match.occurrences == words.count(target)
    assert set(match.positions) <= set(match.matched_positions)
    assert match.matched_positions == tuple(i for i, w in enumerate(words) if w == target)
    if match.found:
        assert match.positions  # a found phrase always keeps at least one position


# ---------------------------------------------------------------------- whole words only
def test_a_phrase_must_cover_whole_words_not_the_tail_or_head_of_one():
    t5 = ["▁a", "▁snow", "man", "▁next", "▁to", "▁a", "▁police", "man", "▁and", "▁a", "▁man"]
    assert locate_phrase(t5, "man").positions == (10,)
    clip = ["oh", "w", "x", "man</w>", "and</w>", "a</w>", "man</w>", "cat</w>"]
    assert locate_phrase(clip, "man").positions == (6,)
    assert locate_phrase(clip, "ohwxman").found
    assert not locate_phrase(["▁pot", "ter"], "pot").found


def test_underscores_and_punctuation_separate_words():
    t5 = ["▁harry", "_", "pot", "ter", ",", "▁da", "i", "y", "u"]
    assert locate_phrase(t5, "harry").positions == (0,)
    assert locate_phrase(t5, "potter").positions == (2, 3)
    clip = ["harry</w>", "_</w>", "potter</w>", ",</w>", "daiyu</w>"]
    assert locate_phrase(clip, "potter").positions == (2,)
    assert locate_phrase(clip, "harry_potter").positions == (0, 2)


def test_a_word_spelled_out_after_a_bare_sentencepiece_marker_starts_a_word():
    pieces = ["▁a", "▁", "o", "h", "w", "x", "▁man"]
    assert locate_phrase(pieces, "ohwx man").occurrences == 1
    assert not locate_phrase(pieces, "hwx").found
