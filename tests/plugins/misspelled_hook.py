from gptkit import hookimpl


@hookimpl
def gptkit_register_attenton(register):  # misspelled on purpose
    pass
