"""The explorer's widgets: the parameter tree, the details pane's renderables, the GPU panel.
They draw what the app sets on them and post messages up; none holds feature state."""
