// Runs an integer graph's operators in one call (mixprec/integer/graph/native_plan.py): a program of steps, each a
// call of one of mixprec's operators through PyTorch's dispatcher (boxed, so any schema) or a reshape (a view), on
// the graph's input tensors, constants and the values of earlier steps. One call from Python instead of one per
// operator: at batch 1 the per-operator Python and conversion overhead (about 10 us each) outweighed the kernels.
//
// Program (an int64 tensor): for each step [kind, argument count, then (tag, payload) per argument]; kind k >= 0 calls ops[k], kind
// -1 reshapes its first argument (a value) to the ints that follow. Tags: 0 a value (payload: its index: the inputs,
// then one per step in order), 1 a constant (index into constants), 2 an int, 3 a bool, 4 None, 5 a double (its
// bits). Trailing arguments a step leaves out take their schema defaults. The result is the last step's value.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

enum Tag : int64_t { kValue = 0, kConstant = 1, kInt = 2, kBool = 3, kNone = 4, kDouble = 5 };
constexpr int64_t kReshape = -1;

// The dispatcher's handle of an operator by name, looked up once per process (handles stay valid).
const c10::OperatorHandle& handle_of(const std::string& name) {
  static std::mutex guard;
  static std::unordered_map<std::string, c10::OperatorHandle> handles;
  const std::lock_guard<std::mutex> lock(guard);
  auto found = handles.find(name);
  if (found == handles.end()) {
    found = handles.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "")).first;
  }
  return found->second;
}

// A program decoded and checked once: per step the operator's handle and its argument stack, with the constants,
// literals and schema defaults already in place and the slots that take earlier values listed. Running it only fills
// those slots and calls the operators.
class Program {
 public:
  Program(int64_t inputs, const std::vector<at::Tensor>& constants, const std::vector<std::string>& ops,
          const at::Tensor& encoded)
      : inputs_(inputs) {
    TORCH_CHECK(encoded.scalar_type() == at::kLong && encoded.dim() == 1 && encoded.is_contiguous(),
                "the program must be a contiguous 1-D int64 tensor");
    std::vector<const c10::OperatorHandle*> handles;
    handles.reserve(ops.size());
    for (const auto& name : ops) handles.push_back(&handle_of(name));
    const int64_t* program = encoded.data_ptr<int64_t>();
    const int64_t size = encoded.numel();
    auto read = [&](int64_t at) {
      TORCH_CHECK(at < size, "the program ends inside a step");
      return program[at];
    };
    auto value = [&](int64_t index) {
      TORCH_CHECK(index >= 0 && index < inputs_ + static_cast<int64_t>(steps_.size()), "step reads value ", index,
                  ", which does not exist yet");
      return index;
    };
    int64_t at = 0;
    while (at < size) {
      const int64_t kind = read(at), count = read(at + 1);
      TORCH_CHECK(kind == kReshape || (kind >= 0 && kind < static_cast<int64_t>(handles.size())),
                  "unknown step kind ", kind);
      TORCH_CHECK(count >= 0, "a negative argument count");
      at += 2;
      Step step;
      if (kind == kReshape) {
        TORCH_CHECK(count >= 1 && read(at) == kValue, "a reshape takes a value, then its sizes");
        step.reshape_source = value(read(at + 1));
        for (int64_t i = 1; i < count; ++i) {
          TORCH_CHECK(read(at + 2 * i) == kInt, "a reshape's sizes are ints");
          step.shape.push_back(read(at + 2 * i + 1));
        }
        at += 2 * count;
        steps_.push_back(std::move(step));
        continue;
      }
      for (int64_t i = 0; i < count; ++i, at += 2) {
        const int64_t tag = read(at), payload = read(at + 1);
        switch (tag) {
          case kValue:
            step.value_slots.emplace_back(step.arguments.size(), value(payload));
            step.arguments.emplace_back();
            break;
          case kConstant:
            TORCH_CHECK(payload >= 0 && payload < static_cast<int64_t>(constants.size()), "no constant ", payload);
            step.arguments.emplace_back(constants[static_cast<size_t>(payload)]);
            break;
          case kInt: step.arguments.emplace_back(payload); break;
          case kBool: step.arguments.emplace_back(payload != 0); break;
          case kNone: step.arguments.emplace_back(c10::IValue()); break;
          case kDouble: {
            double number;
            std::memcpy(&number, &payload, sizeof number);
            step.arguments.emplace_back(number);
            break;
          }
          default: TORCH_CHECK(false, "unknown argument tag ", tag);
        }
      }
      step.handle = handles[static_cast<size_t>(kind)];
      const auto& declared = step.handle->schema().arguments();
      TORCH_CHECK(step.arguments.size() <= declared.size(), "a step passes ", step.arguments.size(), " arguments to ",
                  step.handle->schema().name(), ", which takes ", declared.size());
      for (size_t i = step.arguments.size(); i < declared.size(); ++i) {  // trailing arguments left to their defaults
        TORCH_CHECK(declared[i].default_value().has_value(), "a step leaves out ", step.handle->schema().name(),
                    "'s argument ", declared[i].name(), ", which has no default");
        step.arguments.push_back(*declared[i].default_value());
      }
      steps_.push_back(std::move(step));
    }
    TORCH_CHECK(!steps_.empty(), "the program has no steps");
  }

  at::Tensor run(const std::vector<at::Tensor>& inputs) const {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == inputs_, "the program takes ", inputs_, " inputs, got ",
                inputs.size());
    std::vector<at::Tensor> values(inputs.begin(), inputs.end());
    values.reserve(inputs.size() + steps_.size());
    torch::jit::Stack stack;
    for (const Step& step : steps_) {
      if (step.handle == nullptr) {
        values.push_back(values[static_cast<size_t>(step.reshape_source)].reshape(step.shape));
        continue;
      }
      stack.assign(step.arguments.begin(), step.arguments.end());
      for (const auto& [slot, index] : step.value_slots) stack[slot] = values[static_cast<size_t>(index)];
      step.handle->callBoxed(&stack);
      TORCH_CHECK(stack.size() == 1 && stack[0].isTensor(), "a step's operator must return one tensor");
      values.push_back(stack[0].toTensor());
    }
    return values.back();
  }

 private:
  struct Step {
    const c10::OperatorHandle* handle = nullptr;  // null: a reshape of reshape_source to shape
    std::vector<c10::IValue> arguments;           // the operator's whole stack; value slots are filled per run
    std::vector<std::pair<size_t, int64_t>> value_slots;  // (argument position, value index)
    int64_t reshape_source = 0;
    std::vector<int64_t> shape;
  };
  int64_t inputs_;
  std::vector<Step> steps_;
};

at::Tensor tflite_run_program(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& constants,
                              const std::vector<std::string>& ops, const at::Tensor& encoded) {
  return Program(static_cast<int64_t>(inputs.size()), constants, ops, encoded).run(inputs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_run_program(Tensor[] inputs, Tensor[] constants, str[] ops, Tensor program) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_run_program", &tflite_run_program);
}

// The extension's Python module (native.py loads it as one): a decoded program callable from Python directly, without
// the dispatcher's call from Python and the conversion of every constant and operator name that tflite_run_program's
// operator makes on every call (measured here: ResNet-8's batch-1 call with 55 constants 90.1 -> 81.3 us).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  pybind11::class_<Program>(module, "Program")
      .def(pybind11::init<int64_t, const std::vector<at::Tensor>&, const std::vector<std::string>&,
                          const at::Tensor&>(),
           pybind11::arg("inputs"), pybind11::arg("constants"), pybind11::arg("ops"), pybind11::arg("program"))
      .def("run", &Program::run, pybind11::arg("inputs"), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def(
          "run_one", [](const Program& program, const at::Tensor& input) { return program.run({input}); },
          pybind11::arg("input"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
