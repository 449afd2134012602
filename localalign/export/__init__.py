"""The export stage: a trained model back to GGUF, checked, with an Ollama Modelfile.

pipeline.py  export_model / export_merged / export_adapter: write, quantize, check, put in place
modelfile.py the Modelfile beside every export (the chat template translated for Ollama)
"""
