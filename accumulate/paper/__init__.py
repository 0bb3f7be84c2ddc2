"""The paper application: reproduction of the notebook and the batch-size study."""
