"""Axolotl's config dialect: its keys, defaults and stock files, read into tunefile's own spelling."""
