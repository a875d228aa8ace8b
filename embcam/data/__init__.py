"""Where bytes are and the formats embcam reads and writes: locations and fetching, image
decoding, the data contracts, the manifest, the run folder and its stored maps. No torch,
no Ray."""
