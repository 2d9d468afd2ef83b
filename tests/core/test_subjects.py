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


# T5-style pieces of "watercolor painting of harry_potter and daiyu_lin"
STYLE_PIECES = [
    "▁water",
    "color",
    "▁painting",
    "▁of",
    "▁harry",
    "_",
    "pot",
    "ter",
    "▁and",
    "▁dai",
    "yu",
    "_",
    "l",
    "in",
]


def locate_style(phrase):
    return locate_phrase(STYLE_PIECES, phrase)


STYLE_CANDIDATES = [
    LoraCandidate("harry", "h", trigger_phrase="harry_potter"),
    LoraCandidate("daiyu", "d", trigger_phrase="daiyu_lin"),
    LoraCandidate("watercolor", "w"),
]


def test_a_lora_whose_name_is_a_prompt_word_is_a_subject_and_the_user_learns_how_to_keep_it_global():
    plan = resolve_subjects(STYLE_CANDIDATES, "", locate_style)
    assert [s.lora for s in plan.subjects] == ["harry", "daiyu", "watercolor"]
    (note,) = [m for m in plan.messages if "name is a word of the prompt" in m]
    assert note.startswith("'watercolor' is a subject because the LoRA's name") and "Subjects box" in note
    two = resolve_subjects([LoraCandidate("harry_potter", "h"), LoraCandidate("daiyu_lin", "d")], "", locate)
    assert two.active and two.messages == []  # two characters by name: the documented use, nothing to say


def test_once_the_subjects_box_names_subjects_a_lora_name_makes_no_subject():
    plan = resolve_subjects(STYLE_CANDIDATES, "harry: harry_potter\ndaiyu: daiyu_lin", locate_style)
    assert [s.lora for s in plan.subjects] == ["harry", "daiyu"]
    assert plan.global_loras == ["watercolor"]
    assert plan.active


def test_a_lora_without_denoiser_weights_is_never_a_subject_and_says_why():
    unusable = {"d": "Forge gave it no weights for this model's denoiser"}
    plan = resolve_subjects(STYLE_CANDIDATES[:2], "", locate_style, unusable=unusable)
    assert [s.lora for s in plan.subjects] == ["harry"]
    assert plan.global_loras == ["daiyu"]
    text = " ".join(plan.messages)
    assert "LoRA 'daiyu' is not a subject: Forge gave it no weights" in text and "found 1" in text


def _three():
    return [
        LoraCandidate("harry", "h.safetensors", trigger_phrase="harry_potter"),
        LoraCandidate("cat", "c.safetensors"),  # its name is a word of the prompt
        LoraCandidate("daiyu", "d.safetensors", trigger_phrase="daiyu_lin"),
    ]


def test_a_lora_marked_as_a_style_is_never_a_subject_whatever_its_name():
    plan = resolve_subjects(_three(), "", locate, styles=["cat"])
    assert [s.lora for s in plan.subjects] == ["harry", "daiyu"] and [c.name for c in plan.styles] == ["cat"]
    assert plan.active and plan.messages == []


def test_one_subject_and_a_style_is_enough():
    plan = resolve_subjects(_three()[:2], "", locate, styles=["cat"])
    assert plan.active and [s.lora for s in plan.subjects] == ["harry"]


def test_style_marks_that_do_not_fit_get_one_message_each():
    plan = resolve_subjects(_three(), "cat: a_cat", locate, styles=["cat", "nobody"])
    assert plan.messages == [
        "LoRA 'cat' is marked as a style and named in the Subjects box; it is a style",
        "style LoRA 'nobody' is not in the prompt (no <lora:nobody:...>); ignored",
    ]  # in the order the Style LoRAs box names them
    only_style = resolve_subjects([LoraCandidate("cat", "c.safetensors")], "", locate, styles=["cat"])
    assert not only_style.active and "style fusion needs a subject LoRA" in only_style.messages[-1]
    unusable = resolve_subjects(_three(), "", locate, unusable={"c.safetensors": "no weights"}, styles=["cat"])
    assert "style LoRA 'cat' cannot be fused: no weights" in unusable.messages[0] and not unusable.styles


def test_parse_style_names():
    from freefuse.subjects import parse_style_names

    assert parse_style_names(" watercolor, ink\nwatercolor ,") == ["watercolor", "ink"]
