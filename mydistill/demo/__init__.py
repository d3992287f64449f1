"""The embedded demo: a synthetic task, a locally trained tokenizer and a cached teacher."""
