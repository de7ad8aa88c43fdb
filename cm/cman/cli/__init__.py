"""One thin module per command; common.py is their shared error funnel."""
