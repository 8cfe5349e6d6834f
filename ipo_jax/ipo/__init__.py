"""The IPO classifier: text layout, instructions, the shape planner, the jitted programs and the scorer."""
