"""Loading: a model folder resolved, checked, planned against memory and read into a VLModel."""
