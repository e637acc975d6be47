"""Captions of real length, shared by the benchmarks (the text tower trims to the longest in a batch)."""

# Captions of the length web alt-text and COCO captions typically have (10-25 tokens).
REAL_CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing with a frisbee in a grassy park on a sunny afternoon",
    "close up of a bowl of fresh fruit salad with strawberries, blueberries and mint",
    "the skyline of a city at night reflected in the river",
    "a kitchen with white cabinets, a stainless steel refrigerator and a wooden table",
    "portrait of a young woman smiling in front of a brick wall",
    "aerial view of a winding road through autumn forest",
    "a red double decker bus driving down a busy street in london",
    "vintage illustration of a sailing ship in a storm",
    "a plate of spaghetti with tomato sauce and basil",
    "children building a sandcastle on the beach",
    "a cat sleeping on a laptop keyboard",
    "snow covered mountains under a clear blue sky with a small cabin in the foreground",
    "a group of people hiking along a rocky trail",
    "black and white photo of an old train station",
    "an elephant walking across a dusty savanna at sunset",
]
