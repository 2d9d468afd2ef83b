// FreeFuse for Forge: hover hints for the accordion (the settings' own tooltips live next to each control).
(function () {
    const hints = {
        "FreeFuse": "Keep each character LoRA to its own subject: masks from attention, applied to each LoRA's output.",
        "Subjects": "Optional 'lora name: trigger phrase' lines; empty finds every <lora:...> whose phrase is in the prompt.",
        "Mask method": "official: what the FreeFuse code runs. paper: sink filter, self-attention, superpixel voting.",
        "Schedule": "restart: a few extra model evaluations find the masks first. continue: masks found during sampling.",
    };
    onUiLoaded(function () {
        if (typeof titles === "object" && titles !== null) {
            for (const [label, hint] of Object.entries(hints)) {
                if (!(label in titles)) titles[label] = hint;
            }
        }
    });
})();
