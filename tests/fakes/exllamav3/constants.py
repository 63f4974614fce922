# Fixed page size for generator (same value as exllamav3/constants.py in the real wheel)
PAGE_SIZE = 256
