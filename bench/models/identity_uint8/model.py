"""Identity: hands the decoded input back as the output, with no copy of its own."""


class Model:
    def load(self, context):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"]}
