"""Which LoRAs become subjects, by which phrase, and what the user is told otherwise."""

from freefuse.subjects import LoraCandidate, parse_subject_lines, resolve_subjects
from freefuse.tokens import locate_phrase

# T5-style pieces of "harry_potter and daiyu_lin hugging, a cat"
PIECES = ["▁harry", "_", "pot", "ter", "▁and", "▁dai", "yu", "_", "l", "in", "▁hugging", ",", "▁a", "▁cat"]


def locate(phrase):
    return locate_phrase(PIECES, phrase)


def test_lines_parse_and_bad_lines_are_reported():
    mapping, problems = parse_subject_lines("harry: harry_potter\n\n# note\nnonsense\ndaiyu : daiyu_lin\nharry: x")
    assert mapping == {"harry": "harry_potter", "daiyu": "daiyu_lin"}
    assert len(problems) == 2
    assert "line 4 ('nonsense')" in problems[0]
    assert "names 'harry' again" in problems[1]


def test_phrase_sources_are_tried_in_priority_order():
    plan = resolve_subjects(
        [
            LoraCandidate("harry", "h.safetensors", activation_text="wizard, harry_potter"),
            LoraCandidate("daiyu", "d.safetensors", trigger_phrase="daiyu_lin"),
        ],
        "",
        locate,
    )
    assert plan.active
    assert [(s.lora, s.phrase, s.source) for s in plan.subjects] == [
        ("harry", "harry_potter", "activation text"),
        ("daiyu", "daiyu_lin", "trigger phrase"),
    ]
    assert plan.subjects[0].match.positions == (0, 2, 3)


def test_the_subjects_box_wins_and_its_phrase_must_be_in_the_prompt():
    plan = resolve_subjects(
        [
            LoraCandidate("harry", "h", trigger_phrase="harry_potter"),
            LoraCandidate("daiyu", "d", "daiyu_lin"),
        ],
        "harry: hermione\nron: ron_weasley",
        locate,
    )
    assert [s.lora for s in plan.subjects] == ["daiyu"]
    assert plan.global_loras == ["harry"]
    text = " ".join(plan.messages)
    assert "'ron'" in text and "no <lora:ron:...>" in text
    assert "'harry' stays global" in text and "'hermione'" in text
    assert "found 1" in text and not plan.active


def test_the_lora_name_itself_is_the_last_resort():
    plan = resolve_subjects([LoraCandidate("cat", "c"), LoraCandidate("dog", "g")], "", locate)
    assert [s.source for s in plan.subjects] == ["lora name"]
    assert plan.global_loras == ["dog"]


def test_overlapping_phrases_keep_the_first_subject():
    plan = resolve_subjects(
        [
            LoraCandidate("a", "a", trigger_phrase="harry_potter"),
            LoraCandidate("b", "b", trigger_phrase="potter"),
            LoraCandidate("c", "c", trigger_phrase="daiyu_lin"),
        ],
        "",
        locate,
    )
    assert [s.lora for s in plan.subjects] == ["a", "c"]
    assert plan.global_loras == ["b"]
    assert any("shares tokens" in m for m in plan.messages)


def test_the_same_file_twice_is_one_candidate():
    plan = resolve_subjects(
        [
            LoraCandidate("harry_potter", "h"),
            LoraCandidate("harry_potter", "h"),
            LoraCandidate("daiyu_lin", "d"),
        ],
        "",
        locate,
    )
    assert [s.lora for s in plan.subjects] == ["harry_potter", "daiyu_lin"]
