// TVM's device API and module loader for device "webgpu", forwarding to Python (runtime/vulkan.py), which
// runs the kernels through wgpu on a Vulkan adapter.
//
// The compiled host code of a `--target vulkan` artifact (TVM's webgpu target) allocates and copies through
// the DeviceAPI registered as "device_api.webgpu", and launches each kernel by calling the function its
// "webgpu" module returns for the kernel's name. TVM's pip wheel has neither for native code (its WebGPU
// runtime lives in the browser), so this file supplies both, and every operation calls back into Python.
// A device "pointer" is an opaque handle the Python side hands out; there is no pointer arithmetic on it.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>

#include <cstdint>
#include <string>

namespace gptj_tvm {

using tvm::ffi::Any;
using tvm::ffi::Function;
using tvm::Device;
using tvm::runtime::DeviceAttrKind;

// The Python callback registered as "gptj_tvm.webgpu.<name>" (runtime/vulkan.py registers them all before
// anything here runs).
static Function Callback(const char* name) {
  auto fn = Function::GetGlobal(std::string("gptj_tvm.webgpu.") + name);
  TVM_FFI_ICHECK(fn.has_value()) << "gptj_tvm.webgpu." << name << " is not registered: "
                                 << "import gptj_tvm.runtime.vulkan and call enable() first";
  return *fn;
}

static int64_t Handle(const void* ptr) { return reinterpret_cast<int64_t>(ptr); }

class BridgeDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  void SetDevice(Device dev) final {}

  void GetAttr(Device dev, DeviceAttrKind kind, Any* rv) final {
    static Function attr = Callback("attr");
    Any value = attr(dev.device_id, static_cast<int>(kind));
    if (value != nullptr) *rv = value;
  }

  void* AllocDataSpace(Device dev, size_t nbytes, size_t alignment, DLDataType type_hint) final {
    static Function alloc = Callback("alloc");
    return reinterpret_cast<void*>(alloc(dev.device_id, static_cast<int64_t>(nbytes)).cast<int64_t>());
  }

  void FreeDataSpace(Device dev, void* ptr) final {
    static Function free = Callback("free");
    free(dev.device_id, Handle(ptr));
  }

  void StreamSync(Device dev, TVMStreamHandle stream) final {
    static Function sync = Callback("sync");
    sync(dev.device_id);
  }

  TVMStreamHandle CreateStream(Device dev) final { return nullptr; }
  void FreeStream(Device dev, TVMStreamHandle stream) final {}
  void SetStream(Device dev, TVMStreamHandle stream) final {}
  TVMStreamHandle GetCurrentStream(Device dev) final { return nullptr; }
  void SyncStreamFromTo(Device dev, TVMStreamHandle from, TVMStreamHandle to) final {}

  static BridgeDeviceAPI* Global() {
    static BridgeDeviceAPI* instance = new BridgeDeviceAPI();
    return instance;
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size,
                      Device dev_from, Device dev_to, DLDataType type_hint, TVMStreamHandle stream) final {
    static Function to_device = Callback("copy_to_device");
    static Function from_device = Callback("copy_from_device");
    static Function within = Callback("copy_within");
    bool src_gpu = dev_from.device_type == kDLWebGPU, dst_gpu = dev_to.device_type == kDLWebGPU;
    int64_t n = static_cast<int64_t>(size);
    if (src_gpu && dst_gpu) {
      TVM_FFI_ICHECK_EQ(dev_from.device_id, dev_to.device_id) << "copies between two Vulkan adapters";
      within(dev_from.device_id, Handle(from), static_cast<int64_t>(from_offset), Handle(to),
             static_cast<int64_t>(to_offset), n);
    } else if (src_gpu && dev_to.device_type == kDLCPU) {
      from_device(dev_from.device_id, Handle(from), static_cast<int64_t>(from_offset),
                  Handle(static_cast<char*>(to) + to_offset), n);
    } else if (dev_from.device_type == kDLCPU && dst_gpu) {
      to_device(dev_to.device_id, Handle(static_cast<const char*>(from) + from_offset), Handle(to),
                static_cast<int64_t>(to_offset), n);
    } else {
      TVM_FFI_THROW(InternalError) << "webgpu copies go between the CPU and the device";
    }
  }
};

// A "webgpu" module of an artifact: its kernels are compiled and launched on the Python side.
class BridgeModule final : public tvm::ffi::ModuleObj {
 public:
  BridgeModule(int64_t id, tvm::ffi::Bytes bytes) : id_(id), bytes_(std::move(bytes)) {}

  const char* kind() const final { return "webgpu"; }

  int GetPropertyMask() const final { return tvm::ffi::Module::kBinarySerializable; }

  tvm::ffi::Bytes SaveToBytes() const final { return bytes_; }

  tvm::ffi::Optional<Function> GetFunction(const tvm::ffi::String& name) final {
    static Function get_function = Callback("get_function");
    return get_function(id_, name).cast<tvm::ffi::Optional<Function>>();
  }

 private:
  int64_t id_;
  tvm::ffi::Bytes bytes_;
};

static tvm::ffi::Module LoadFromBytes(const tvm::ffi::Bytes& bytes) {
  static Function load_module = Callback("load_module");
  int64_t id = load_module(bytes).cast<int64_t>();
  return tvm::ffi::Module(tvm::ffi::make_object<BridgeModule>(id, bytes));
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("ffi.Module.load_from_bytes.webgpu", LoadFromBytes)
      .def_packed("device_api.webgpu", [](tvm::ffi::PackedArgs args, Any* rv) {
        *rv = static_cast<void*>(BridgeDeviceAPI::Global());
      });
}

}  // namespace gptj_tvm
