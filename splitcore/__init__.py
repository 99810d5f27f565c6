"""Models without networks: load GPT-2, cut it into bottom / trunk / top, and generate with any of them."""
