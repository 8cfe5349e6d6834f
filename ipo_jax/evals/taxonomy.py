"""The RewardBench taxonomy, in one place: subsets, their sections and example counts, the IPO paper's four
categories, and the category of a subset (which picks its yes/no question)."""

from __future__ import annotations

# RewardBench's section weights (rewardbench/constants.py): math-prm counts 984 (= 6 x 164) so that math and code
# weigh the same in Reasoning, though it has 447 pairs.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# The leaderboard's "Prior Sets (0.5 weight)": the mean of these, weighted 1 against 2 for each section.
PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
# The IPO paper's table: Chat (Chat + Chat Hard), Code (hep-*), Math (math-prm), Safety; overall a plain mean.
PAPER_CATEGORIES = {
    "Chat": SUBSET_MAPPING["Chat"] + SUBSET_MAPPING["Chat Hard"],
    "Code": SUBSET_MAPPING["Reasoning"][1:],
    "Math": ("math-prm",),
    "Safety": SUBSET_MAPPING["Safety"],
}

CATEGORIES = ("chat", "code", "math", "safety")

# The category of each RewardBench subset: the paper's four, lower-cased.
SUBSET_CATEGORY = {s: category.lower() for category, subsets in PAPER_CATEGORIES.items() for s in subsets}


def category_of(subset: str) -> str | None:
  """chat / code / math / safety for a RewardBench subset (also recognises hep-* and math-* names)."""
  if subset in SUBSET_CATEGORY:
    return SUBSET_CATEGORY[subset]
  if subset.startswith("hep-"):
    return "code"
  if subset.startswith("math"):
    return "math"
  return None


def known_subset(subset: str) -> bool:
  """A RewardBench subset (one of the 23 or a prior set) or a name with a category (e.g. hep-kotlin)."""
  return subset in EXAMPLE_COUNTS or subset in PRIOR_SETS or category_of(subset) is not None
