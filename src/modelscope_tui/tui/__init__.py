"""The Textual explorer. Only this package imports textual."""
