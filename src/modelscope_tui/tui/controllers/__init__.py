"""The explorer's feature state, in plain Python (no Textual): what the app shows and which
background job is current. The app runs their slow methods on worker threads and hands the
results back on the UI thread; tests drive them without a terminal."""
