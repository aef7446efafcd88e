"""What every stage shares about pet data: decoding pixels, the dataset schema, synthetic pets, the reader."""
