pytest_plugins = ["tests.helpers", "tests.vlm_fixtures", "tests.colpali_fixtures"]
