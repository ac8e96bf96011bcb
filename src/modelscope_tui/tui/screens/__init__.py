"""The explorer's modal screens, one module each. A screen returns its answer through `dismiss`;
none changes state itself."""
